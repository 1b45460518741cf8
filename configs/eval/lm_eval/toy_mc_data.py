"""Loader of the toy_mc tasks' data for lm-evaluation-harness (its `custom_dataset` hook imports this file from the
task folder): the rows of toy_mc.jsonl, next to this file, of one toy task, as an in-memory test split (no hub, no
datasets cache)."""
import json
from pathlib import Path

DATA = Path(__file__).resolve().with_name("toy_mc.jsonl")


def load(task=None, **metadata):
    """{"test": Dataset} of the rows whose "task" is `task` (all rows when None); lm-eval passes the task's
    metadata as further keyword arguments, which are ignored."""
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if task is None or r["task"] == task]
    if not rows:
        raise ValueError(f"{DATA}: no rows of toy task {task!r}")
    return DatasetDict({"test": Dataset.from_list(rows)})
