"""Multiple-choice items from the toy world's evaluation split, for log-likelihood scoring (lm-evaluation-harness).

Each item is one of the toy eval's benign prompts, wrapped in the same prompt template the toy eval uses
(configs/eval/toy.yaml: "qa"), with a closed set of answers: sentiment (positive / negative), topic (world /
sports / business / tech) and facts (the gold capital among three other capitals, drawn with a seed). The shipped
task data (configs/eval/lm_eval/toy_mc.jsonl) is this module's output; regenerate it with

    python -m immunize.datamodules.toy.multiple_choice            # rewrites configs/eval/lm_eval/toy_mc.jsonl
    python -m immunize.datamodules.toy.multiple_choice OUT.jsonl  # anywhere else

(tests/test_lm_eval_bridge.py checks that the shipped file equals a regeneration).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

from immunize.datamodules.templates import format_prompt
from immunize.datamodules.toy import lexicon as lx
from immunize.datamodules.toy.world import ToyWorld
from immunize.errors import UserError

MC_TASKS = ("sentiment", "topic", "facts")
SENTIMENT_CHOICES = ("positive", "negative")
FACT_DISTRACTORS = 3
SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "eval" / "lm_eval" / "toy_mc.jsonl"


def _choices(task: str, reference: str, prompt: str, seed: int) -> tuple[list[str], int]:
    """(answer options, index of the gold one) of one item."""
    if task == "sentiment":
        options = list(SENTIMENT_CHOICES)
    elif task == "topic":
        options = list(lx.TOPICS)
    else:  # facts: the gold city and distinct other capitals, in a seeded order
        rng = random.Random(f"{seed}:toy-mc:facts:{prompt}")
        options = rng.sample([c for c in lx.FACT_CITIES if c != reference], FACT_DISTRACTORS)
        options.insert(rng.randrange(FACT_DISTRACTORS + 1), reference)
    if reference not in options:
        raise UserError(f"toy multiple choice: the gold answer {reference!r} of a {task} item is not among {options}")
    return options, options.index(reference)


def multiple_choice_items(seed: int = 0, n_per_task: int = 100, tasks: Sequence[str] = MC_TASKS,
                          template: str = "qa") -> list[dict]:
    """The first `n_per_task` evaluation items of each task as multiple-choice rows.

    Args:
        seed: the toy world's seed (the same items as `ToyWorld(seed).eval_items`).
        n_per_task: items per task (the toy eval's own `n_per_task` prefix of the eval split).
        tasks: any of sentiment, topic, facts.
        template: prompt template wrapped around the prompt (the toy eval's is "qa").

    Returns:
        rows {"id", "task", "prompt" (bare), "query" (templated: the context scored), "choices", "gold" (index)}.
    """
    unknown = [t for t in tasks if t not in MC_TASKS]
    if unknown:
        raise UserError(f"toy multiple choice: task {unknown[0]!r} has no closed answer set; choose from {list(MC_TASKS)}")
    if n_per_task < 1:
        raise UserError(f"toy multiple choice: n_per_task must be >= 1, got {n_per_task}")
    world, rows = ToyWorld(seed), []
    for task in tasks:
        items = world.eval_items(n_harmful_per_category=0, n_per_task=n_per_task, tasks=[task])
        for i, it in enumerate(items):
            choices, gold = _choices(task, it.reference, it.prompt, seed)
            rows.append({"id": f"{task}-{i:04d}", "task": task, "prompt": it.prompt,
                         "query": format_prompt(template, it.prompt), "choices": choices, "gold": gold})
    return rows


def jsonl_text(rows: list[dict]) -> str:
    """The rows as JSON lines (sorted keys, one row a line): the shipped file's exact bytes."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write_items(path: Optional[Path] = None, **kwargs) -> Path:
    """Write `multiple_choice_items(**kwargs)` as JSON lines to `path` (default: the shipped task file).

    Args:
        path: output file (default: configs/eval/lm_eval/toy_mc.jsonl of this checkout).
        **kwargs: multiple_choice_items' arguments.
    """
    target = Path(path) if path is not None else SHIPPED
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(jsonl_text(multiple_choice_items(**kwargs)))
    return target


if __name__ == "__main__":
    out = write_items(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"wrote {out}")
