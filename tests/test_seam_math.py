"""SEAM math core: flat-gradient helpers, logit lens, and the Hessian-free L_sd gradient vs exact HVPs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from immunize.errors import UserError
from lightning_modules.grad_math import add_scaled_, all_reduce_mean_, dot, global_norm, grads_of, masked_ce
from lightning_modules.hessian_free import cosine_directions, exact_sd_grad, finite_difference_sd_grad
from lightning_modules.logit_lens import bounded_ascent, logit_lens_ce

VOCAB = 64


def tiny_llama(dtype=torch.float32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """Tiny random Llama; eager attention because SDPA kernels have no double backward."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def batch(seed: int, prompt_len: int = 4):
    """Random tokens with response-only labels (prompt positions are -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def loss_fns(model):
    (xa, ya), (xb, yb) = batch(1), batch(2)
    return (lambda: masked_ce(model(input_ids=xa).logits, ya)), (lambda: masked_ce(model(input_ids=xb).logits, yb))


def rel_err(est, ref) -> float:
    return float(global_norm([e - r for e, r in zip(est, ref)]) / global_norm(ref))


def cosine(a, b) -> float:
    return float(dot(a, b) / (global_norm(a) * global_norm(b)))


def test_global_norm_and_dot_match_cat():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=gen), torch.randn(7, generator=gen), torch.randn(2, 2, 2, generator=gen)]
    b = [torch.randn(t.shape, generator=gen) for t in a]
    flat_a, flat_b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    assert torch.allclose(dot(a, b), flat_a @ flat_b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(global_norm(a), flat_a.norm(), rtol=1e-6)
    half = [t.bfloat16() for t in a]
    assert global_norm(half).dtype == torch.float32
    assert all_reduce_mean_(a) is a  # not distributed: no-op


def test_masked_ce_matches_manual():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, 4] = -100
    terms = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
             for b in range(2) for t in range(1, 6) if labels[b, t] != -100]
    assert torch.allclose(masked_ce(logits, labels), torch.stack(terms).mean(), rtol=1e-6)
    assert masked_ce(logits.bfloat16(), labels).dtype == torch.float32
    assert masked_ce(logits, torch.full_like(labels, -100)).item() == 0.0  # no NaN on an empty mask


def test_hidden_states_layout_last_is_post_norm():
    """transformers 5.x: embedding + layers 1..L-1 (pre-norm) and, last, the final output AFTER model.norm."""
    model = tiny_llama(layers=3)
    ids, _ = batch(0)
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    out = model(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    hs = out.hidden_states
    assert len(hs) == 3 + 1
    assert torch.equal(hs[0], model.model.embed_tokens(ids))
    for k in range(1, 3):
        assert torch.allclose(hs[k], captured[k - 1])
    assert torch.allclose(hs[-1], model.model.norm(captured[-1]), atol=1e-6)
    assert torch.allclose(model.lm_head(hs[-1]), out.logits, atol=1e-6)
    assert not torch.allclose(model.lm_head(model.model.norm(hs[-1])), out.logits, atol=1e-5)  # no 2nd norm


def test_logit_lens_ce_matches_manual_loop():
    model = tiny_llama(layers=3)
    ids, labels = batch(3)
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    out = model(input_ids=ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    got = logit_lens_ce(out.hidden_states, out.logits, labels, model.lm_head, model.model.norm)

    # Independent: normalise the embedding and every raw layer output once, project, CE by hand.
    states = [model.model.embed_tokens(ids)] + captured
    active = labels[:, 1:] != -100
    ces = []
    for h in states:
        logp = F.log_softmax(model.lm_head(model.model.norm(h))[:, :-1], -1)
        nll = -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ces.append(nll[active].mean())
    expected = torch.stack(ces).sum() / len(states)  # L + 1 terms, honest mean
    assert len(states) == len(out.hidden_states) == 4
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(bounded_ascent(got), -torch.log(1 + expected), rtol=1e-5)
    got.backward()  # differentiable end to end
    assert model.model.embed_tokens.weight.grad is not None


def test_cosine_directions_match_flat_formula():
    gen = torch.Generator().manual_seed(1)
    g_a = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    g_b = [torch.randn(t.shape, generator=gen) + 0.5 * t for t in g_a]
    c, v_a, v_b, na, nb = cosine_directions(g_a, g_b)
    fa, fb = torch.cat([t.reshape(-1) for t in g_a]), torch.cat([t.reshape(-1) for t in g_b])
    ua, ub = fa / fa.norm(), fb / fb.norm()
    cf = ua @ ub
    assert torch.allclose(c, cf, rtol=1e-6) and torch.allclose(na, fa.norm()) and torch.allclose(nb, fb.norm())
    assert torch.allclose(torch.cat([t.reshape(-1) for t in v_a]), ub - cf * ua, atol=1e-6)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in v_b]), ua - cf * ub, atol=1e-6)
    assert math.isclose(float(global_norm(v_a)), math.sqrt(1 - float(cf) ** 2), rel_tol=1e-5)


def test_exact_sd_grad_matches_functional_hvp():
    """exact_sd_grad (grad of the cosine) == H_a v_a/|g_a| + H_b v_b/|g_b| from torch.autograd.functional.hvp."""
    model = tiny_llama(torch.float64)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    loss_a, loss_b = loss_fns(model)
    exact = exact_sd_grad(params, loss_a, loss_b)

    (xa, ya), (xb, yb) = batch(1), batch(2)

    def functional_loss(ids, labels):
        def f(*ps):
            logits = torch.func.functional_call(model, dict(zip(names, ps)), (ids,)).logits
            return masked_ce(logits, labels)
        return f

    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)
    _, v_a, v_b, na, nb = cosine_directions(g_a, g_b)
    _, hva = torch.autograd.functional.hvp(functional_loss(xa, ya), tuple(p.detach() for p in params), tuple(v_a))
    _, hvb = torch.autograd.functional.hvp(functional_loss(xb, yb), tuple(p.detach() for p in params), tuple(v_b))
    independent = [x / na + y / nb for x, y in zip(hva, hvb)]
    assert rel_err(exact, independent) < 1e-6  # RMSNorm and RoPE compute in fp32 even in fp64 models


def test_finite_difference_matches_exact_and_restores_params():
    model = tiny_llama(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss_a, loss_b = loss_fns(model)
    exact = exact_sd_grad(params, loss_a, loss_b)
    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)
    calls = []

    def recording_reduce(ts):
        calls.append(len(ts))
        return all_reduce_mean_(ts)

    errors = {}
    for eps in (1e-1, 1e-2, 1e-3):
        est, stats = finite_difference_sd_grad(params, lambda: grads_of(loss_a(), params),
                                               lambda: grads_of(loss_b(), params), g_a, g_b, eps,
                                               reduce=recording_reduce)
        errors[eps] = rel_err(est, exact)
        assert all(torch.equal(p, b) for p, b in zip(params, before)), "params not restored exactly"
    assert cosine(est, exact) >= 0.999 and errors[1e-3] <= 1e-2, errors
    assert errors[1e-2] < errors[1e-1] / 3, errors  # forward difference: error ~ eps
    assert calls == [len(params)] * 6  # both perturbed gradients go through the reduce hook
    assert math.isclose(stats["cosine"], cosine(g_a, g_b), rel_tol=1e-5)
    assert stats["norm_a"] > 0 and stats["norm_b"] > 0 and not stats["skipped"]
    assert math.isclose(stats["est_norm"], float(global_norm(est)), rel_tol=1e-6)


def test_params_restored_when_gradient_pass_fails():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss_a, loss_b = loss_fns(model)
    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        finite_difference_sd_grad(params, boom, boom, g_a, g_b, 1e-3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_zero_gradient_is_skipped():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    zeros = [torch.zeros_like(p) for p in params]
    est, stats = finite_difference_sd_grad(params, lambda: zeros, lambda: zeros, zeros, zeros, 1e-3)
    assert stats["skipped"] and float(global_norm(est)) == 0.0


def test_half_precision_params_are_refused():
    p32 = torch.nn.Parameter(torch.ones(3))
    add_scaled_([p32], [torch.full((3,), 2.0)], 0.5)
    assert torch.equal(p32.data, torch.full((3,), 2.0))
    p16 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(UserError, match="bf16-mixed"):
        add_scaled_([p16], [torch.ones(3)], 1e-3)
    model = tiny_llama(torch.bfloat16)
    params = list(model.parameters())
    g = [torch.ones_like(p, dtype=torch.float32) for p in params]
    with pytest.raises(UserError, match="fp32"):
        finite_difference_sd_grad(params, lambda: g, lambda: g, g, g, 1e-3)
    assert torch.equal(p16.data, torch.ones(3, dtype=torch.bfloat16))


_WORKER = """
import importlib.util, sys, torch, torch.distributed as dist
spec = importlib.util.spec_from_file_location("grad_math", sys.argv[3])  # skip the heavy package __init__
gm = importlib.util.module_from_spec(spec); spec.loader.exec_module(gm)
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
ts = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 * rank)]
gm.all_reduce_mean_(ts)
assert torch.equal(ts[0], torch.full((3,), 0.5)) and torch.equal(ts[1], torch.full((2, 2), 5.0)), ts
dist.destroy_process_group()
"""


def test_all_reduce_mean_across_two_gloo_ranks(tmp_path):
    import os
    import subprocess
    import sys

    import lightning_modules.grad_math as gm

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(rank), str(tmp_path / "store"), gm.__file__],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
