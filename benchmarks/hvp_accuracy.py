"""Accuracy of SEAM's Hessian-free L_sd gradient (forward difference, Eq. 6) against the exact double backward.

Builds a small random fp32 Llama, takes a few SGD steps so the gradients are not those of a fresh
init, then compares the estimate with the exact gradient of cos(g_a, g_b) for several eps.
Usage: python benchmarks/hvp_accuracy.py [--json] [--seed N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from immunize.lightning_modules.functional.grad_math import dot, global_norm, grads_of, masked_ce  # noqa: E402
from immunize.lightning_modules.functional.hessian_free import exact_sd_grad, finite_difference_sd_grad  # noqa: E402

EPS_GRID = (1e-1, 1e-2, 1e-3, 1e-4)
MODEL = dict(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128)
BATCH, SEQ, PROMPT = 4, 32, 8


def make_batch(gen: torch.Generator, vocab: int):
    """Random tokens with response-only labels."""
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    return ids, labels


def build(seed: int):
    """Seeded fp32 Llama (eager attention: SDPA has no double backward) after a few SGD steps, plus batches a, b."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, tie_word_embeddings=False, attn_implementation="eager")).eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        ids, labels = make_batch(gen, MODEL["vocab_size"])
        opt.zero_grad()
        masked_ce(model(input_ids=ids).logits, labels).backward()
        opt.step()
    return model, make_batch(gen, MODEL["vocab_size"]), make_batch(gen, MODEL["vocab_size"])


def run(seed: int) -> dict:
    model, (xa, ya), (xb, yb) = build(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_a = lambda: masked_ce(model(input_ids=xa).logits, ya)  # noqa: E731
    loss_b = lambda: masked_ce(model(input_ids=xb).logits, yb)  # noqa: E731
    t0 = time.perf_counter()
    exact = exact_sd_grad(params, loss_a, loss_b)
    exact_s = time.perf_counter() - t0
    exact_norm = global_norm(exact)
    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)
    by_eps, stats, est_s = {}, {}, 0.0
    for eps in EPS_GRID:
        t0 = time.perf_counter()
        est, stats = finite_difference_sd_grad(params, lambda: grads_of(loss_a(), params),
                                               lambda: grads_of(loss_b(), params), g_a, g_b, eps)
        est_s = time.perf_counter() - t0 if eps == 1e-3 else est_s
        est64, exact64 = [e.double() for e in est], [x.double() for x in exact]  # metrics in fp64
        diff = global_norm([e - x for e, x in zip(est64, exact64)])
        norm64 = global_norm(exact64)
        by_eps[str(eps)] = {"cosine": float(dot(est64, exact64) / (global_norm(est64) * norm64)),
                            "relative_error": float(diff / norm64)}
    at = by_eps["0.001"]
    return {"eps": by_eps, "cosine": at["cosine"], "relative_error": at["relative_error"], "default_eps": 1e-3,
            "cos_ab": stats["cosine"], "norm_a": stats["norm_a"], "norm_b": stats["norm_b"],
            "exact_norm": float(exact_norm), "exact_seconds": round(exact_s, 3), "estimate_seconds": round(est_s, 3),
            "n_params": sum(p.numel() for p in params), "dtype": "float32", "seed": seed, "model": MODEL}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny model: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.seed)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"fp32 Llama, {result['n_params']} params, cos(g_a, g_b) = {result['cos_ab']:+.4f}, seed {args.seed}")
    print(f"{'eps':>8} {'cosine':>10} {'rel.error':>10}")
    for eps, row in result["eps"].items():
        print(f"{eps:>8} {row['cosine']:>10.6f} {row['relative_error']:>10.2e}")
    print("error ~ eps (truncation) until fp32 round-off (~1e-7/eps) takes over at small eps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
