"""The same multiple-choice items scored three ways: lm-evaluation-harness, our own log-likelihood scoring, and
greedy generation.

For each model directory, the shipped toy_mc items (configs/eval/lm_eval/toy_mc.jsonl: the toy eval's sentiment,
topic and facts prompts) are scored by
  harness     immunize.lightning_modules.evaluation.lm_eval_bridge.run_lm_eval (lm-eval's HFLM on the loaded model, in-process),
  ours        immunize.lightning_modules.evaluation.multiple_choice (the same conditioning, written without lm-eval),
  generation  the answer the model writes greedily to the same query, matched to the gold choice as the toy
              eval matches answers (immunize.metrics.match_answer with the task's match mode).
It prints, per model and task: the accuracy of each, the share of items where the harness and our scoring pick
the same choice (and the largest log-likelihood difference), and how far log-likelihood correctness and
generation correctness agree item by item (agreement %, Cohen's kappa).

Usage: python benchmarks/lm_eval_agreement.py NAME=MODEL_DIR [NAME=MODEL_DIR ...] [--limit N] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from immunize.datamodules.evaluation import TASK_MATCH  # noqa: E402
from immunize.datamodules.toy.multiple_choice import MC_TASKS, SHIPPED  # noqa: E402
from immunize.io import atomic_write_json  # noqa: E402
from immunize.judges.agreement import cohen_kappa  # noqa: E402
from immunize.metrics import match_answer  # noqa: E402
from immunize.lightning_modules import CausalLMModule  # noqa: E402
from immunize.lightning_modules.evaluation.generation import greedy_generate  # noqa: E402
from immunize.lightning_modules.evaluation.lm_eval_bridge import run_lm_eval  # noqa: E402
from immunize.lightning_modules.evaluation.multiple_choice import choice_loglikelihoods  # noqa: E402

SUBTASK = {task: f"toy_mc_{task}" for task in MC_TASKS}


def generations(module: CausalLMModule, items: list[dict], max_new_tokens: int = 16, batch: int = 64) -> list[str]:
    tok = module.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    out = []
    try:
        for start in range(0, len(items), batch):
            enc = tok([it["query"] for it in items[start:start + batch]], return_tensors="pt", padding=True)
            out += greedy_generate(module.model, tok, enc.input_ids, enc.attention_mask, max_new_tokens)
    finally:
        tok.padding_side = side
    return out


def measure(model_dir: str, rows: list[dict], limit: int | None) -> dict:
    module = CausalLMModule(model=model_dir).eval()
    per_task = {t: [r for r in rows if r["task"] == t][:limit] for t in MC_TASKS}
    harness = run_lm_eval(module.model, module.tokenizer, ["toy_mc"], limit=limit, batch_size=64)
    by_id = {s["doc"]["id"]: [float(resp[0]) for resp in s["filtered_resps"]] for s in harness["samples"]}
    result = {}
    for task, items in per_task.items():
        with torch.no_grad():
            ours = choice_loglikelihoods(module.model, module.tokenizer, items)
        theirs = [by_id[it["id"]] for it in items]
        pick_ours = [int(np.argmax(s)) for s in ours]
        pick_theirs = [int(np.argmax(s)) for s in theirs]
        gold = [int(it["gold"]) for it in items]
        answers = generations(module, items)
        gen_ok = [match_answer(TASK_MATCH[task], a, it["choices"][it["gold"]]) for a, it in zip(answers, items)]
        ll_ok = [p == g for p, g in zip(pick_ours, gold)]
        both = np.array(ll_ok, dtype=float), np.array(gen_ok, dtype=float)
        kappa = cohen_kappa(*both)
        result[task] = {
            "items": len(items),
            "harness_acc": harness["metrics"][f"lm_eval/{SUBTASK[task]}/acc"],
            "ours_acc": 100.0 * float(np.mean(ll_ok)),
            "same_choice": 100.0 * float(np.mean([a == b for a, b in zip(pick_ours, pick_theirs)])),
            "max_abs_loglik_diff": float(max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b))),
            "generation_acc": 100.0 * float(np.mean(gen_ok)),
            "ll_vs_generation_agreement": 100.0 * float(np.mean(both[0] == both[1])),
            "ll_vs_generation_kappa": None if kappa is None else round(kappa, 4),
        }
    result["toy_mc"] = {"harness_acc": harness["metrics"]["lm_eval/toy_mc/acc"],
                        "ours_acc": float(np.average([result[t]["ours_acc"] for t in MC_TASKS],
                                                     weights=[result[t]["items"] for t in MC_TASKS]))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all 100)")
    parser.add_argument("--json", default=None, help="write the numbers here too")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines() if line.strip()]
    out = {}
    for spec in args.models:
        name, _, path = spec.partition("=")
        if not path or not os.path.isdir(path):
            sys.exit(f"lm_eval_agreement: error: {spec!r} is not NAME=MODEL_DIR with an existing directory")
        out[name] = measure(path, rows, args.limit)
    print("| model | task | items | harness acc | ours acc | same choice % | max |Δ loglik| | generation acc "
          "| ll vs gen agreement % | kappa |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, res in out.items():
        for task in MC_TASKS:
            r = res[task]
            print(f"| {name} | {task} | {r['items']} | {r['harness_acc']:.1f} | {r['ours_acc']:.1f} | "
                  f"{r['same_choice']:.1f} | {r['max_abs_loglik_diff']:.1e} | {r['generation_acc']:.1f} | "
                  f"{r['ll_vs_generation_agreement']:.1f} | {r['ll_vs_generation_kappa']} |")
        print(f"| {name} | toy_mc (all) | | {res['toy_mc']['harness_acc']:.1f} | {res['toy_mc']['ours_acc']:.1f} "
              "| | | | | |")
    if args.json:
        atomic_write_json(args.json, out)


if __name__ == "__main__":
    main()
