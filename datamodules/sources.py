"""Loaders for real public datasets (hub id or local .json/.jsonl/.parquet) turned into typed records.

Local files have a single split, so `split` (and `name`) only matter for hub ids. Order is the dataset's
own order and `limit` keeps the first N records, so results are deterministic without a seed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

from immunize.datamodules.records import OVER_REFUSAL, EvalItem, Example, Pair
from immunize.errors import UserError, require

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}  # XSTest ships csv

SST2_LABELS = {0: "negative", 1: "positive"}
AGNEWS_LABELS = {0: "World", 1: "Sports", 2: "Business", 3: "Sci/Tech"}
SST2_PROMPT = "What is the sentiment of the following sentence? Answer with one word, positive or negative.\n{}"
AGNEWS_PROMPT = "Classify the news article into one of the categories World, Sports, Business or Sci/Tech.\n{}"
GSM8K_FINAL = re.compile(r"^\s*####\s*(.*?)\s*$", re.MULTILINE)


def _first_line(exc: BaseException) -> str:
    """First line of an exception's message and of its root cause, so UserErrors stay one line."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [(str(e).strip().splitlines() or [type(e).__name__])[0] for e in dict.fromkeys((exc, root))]
    return " (".join(lines) + ")" * (len(lines) - 1)


def _is_local(source: str) -> bool:
    """A source is a local file when it has a data-file suffix, looks like a path, or exists as a file."""
    path = Path(source).expanduser()
    return path.suffix.lower() in LOCAL_FORMATS or source.startswith(("/", ".", "~")) or path.is_file()


def _no_rows(path: Path, builder: str) -> bool:
    """A local file with no rows at all (datasets fails on these with an obscure message)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows == 0
        except Exception:
            return False  # unreadable: let the loader report it
    return path.stat().st_size <= 64 and path.read_text(errors="replace").strip() in ("", "[]")


def _load_local(source: str):
    """Read a local json/jsonl/parquet/csv file as one datasets.Dataset (its only split)."""
    import datasets

    path = Path(source).expanduser()
    require(path.exists(), f"{source}: no such file; pass a local .json/.jsonl/.parquet file or a hub id")
    builder = LOCAL_FORMATS.get(path.suffix.lower())
    require(path.is_file() and builder is not None, f"{source}: not a .json/.jsonl/.parquet/.csv file")
    require(not _no_rows(path, builder), f"{source}: dataset is empty; the file has no rows")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise UserError(f"cannot read '{source}': {_first_line(exc)}") from exc


def _load_hub(source: str, split: str, name: Optional[str]):
    """Load one split of a hub dataset, turning any failure into a one-line UserError."""
    import datasets

    try:
        return datasets.load_dataset(source, name, split=split)
    except Exception as exc:
        raise UserError(
            f"cannot load dataset '{source}': {_first_line(exc)}; pass a local .json/.jsonl/.parquet file or check the id"
        ) from exc


def load_rows(source: str, split: str = "train", fields: tuple[str, ...] = (), name: Optional[str] = None,
              text: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a hub dataset split or a local file as dicts, after checking the required fields exist and that the
    `text` fields hold text in every row (a null output would otherwise train on the string "None" or crash)."""
    ds = _load_local(source) if _is_local(source) else _load_hub(source, split, name)
    require(len(ds) > 0, f"{source}: dataset is empty; check the file or the split ({split!r})")
    columns = list(ds.column_names)
    for field in fields:
        require(field in columns, f"{source}: missing field '{field}' (expected fields: {', '.join(fields)}; found: {', '.join(columns)})")
    rows = ds.to_list()
    check_text(source, rows, text)
    return rows


def check_text(source: str, rows: list[dict], text: tuple[str, ...]) -> None:
    """Every row holds text in each of the `text` fields, or a one-line UserError naming the file, row and field."""
    for i, row in enumerate(rows):
        for field in text:
            value = row.get(field)
            require(isinstance(value, str), f"{source}: row {i + 1} has {field!r} = {value!r}, not text; fix or drop "
                                            "that row")


def _take(records: list, limit: Optional[int]) -> list:
    """The first `limit` records (all when None)."""
    require(limit is None or limit >= 0, f"limit must be >= 0, got {limit}")
    return records if limit is None else records[:limit]


def _as_bool(value: Any) -> bool:
    """A boolean from a bool/int or a "true"/"false" string (bool("False") would be True)."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _category(value: Any) -> Optional[str]:
    """BeaverTails category: the first true key of its name->bool dict, or a plain string."""
    if isinstance(value, dict):
        return next((key for key, flag in value.items() if _as_bool(flag)), None)
    return (value.strip() or None) if isinstance(value, str) else None


def _label(source: str, labels: dict[int, str], value: Any) -> str:
    """Label word for an integer class id (or an already-worded label); unknown labels are a UserError."""
    if isinstance(value, str):
        words = {w.lower(): w for w in labels.values()}
        if value.strip().lower() in words:
            return words[value.strip().lower()]
        value = int(value) if value.strip().lstrip("-").isdigit() else value
    require(value in labels, f"{source}: label {value!r} is not one of {labels} (unlabelled test split?)")
    return labels[value]


def beavertails(
    source: str, split: str = "30k_train", harmful_only: bool = True, with_refusal: bool = False, limit: Optional[int] = None
) -> Union[list[Example], list[Pair]]:
    """BeaverTails QA rows as Examples, or as Pairs with a `refusal` column (for alignment data)."""
    fields = ("prompt", "response", "category", "is_safe") + (("refusal",) if with_refusal else ())
    rows = load_rows(source, split, fields, text=("prompt", "response") + (("refusal",) if with_refusal else ()))
    if harmful_only:
        rows = [r for r in rows if not _as_bool(r["is_safe"])]
    if with_refusal:
        out = [Pair(r["prompt"], harmful_response=r["response"], refusal=r["refusal"], category=_category(r["category"])) for r in rows]
    else:
        out = [
            Example(r["prompt"], r["response"], category=_category(r["category"]), is_harmful=not _as_bool(r["is_safe"]), task="beavertails")
            for r in rows
        ]
    return _take(out, limit)


def beavertails_eval(source: str, split: str = "30k_test", limit: Optional[int] = None) -> list[EvalItem]:
    """Unsafe BeaverTails prompts as harmful EvalItems, each prompt once."""
    seen: set[str] = set()
    items = []
    for r in load_rows(source, split, ("prompt", "category", "is_safe"), text=("prompt",)):
        if not _as_bool(r["is_safe"]) and r["prompt"] not in seen:
            seen.add(r["prompt"])
            items.append(EvalItem(r["prompt"], kind="harmful", category=_category(r["category"]), response=r.get("response")))
    return _take(items, limit)


def xstest_eval(source: str, split: str = "train", limit: Optional[int] = None) -> list[EvalItem]:
    """XSTest-format prompts (fields prompt, label "safe"/"unsafe", type): the safe ones, as over-refusal items
    (category = their type, e.g. homonyms); the unsafe contrast prompts are left out."""
    rows = load_rows(source, split, ("prompt", "label"), text=("prompt",))
    require(any(str(r["label"]).strip().lower() in ("safe", "unsafe") for r in rows),
            f"{source}: field 'label' has no 'safe'/'unsafe' values; an XSTest file labels each prompt safe or unsafe")
    items = [EvalItem(r["prompt"], kind=OVER_REFUSAL, category=r.get("type"))
             for r in rows if str(r["label"]).strip().lower() == "safe"]
    return _take(items, limit)


def sst2(source: str = "stanfordnlp/sst2", split: str = "train", limit: Optional[int] = None) -> list[Example]:
    """SST-2 sentences as sentiment instructions answered "positive"/"negative"."""
    rows = _take(load_rows(source, split, ("sentence", "label"), text=("sentence",)), limit)
    return [Example(SST2_PROMPT.format(r["sentence"].strip()), _label(source, SST2_LABELS, r["label"]), task="sst2") for r in rows]


def sst2_eval(source: str = "stanfordnlp/sst2", split: str = "validation", limit: Optional[int] = None) -> list[EvalItem]:
    """SST-2 sentiment prompts with the gold label word as reference."""
    return [EvalItem(e.prompt, kind="sst2", reference=e.response, response=e.response) for e in sst2(source, split, limit)]


def agnews(source: str = "fancyzhx/ag_news", split: str = "train", limit: Optional[int] = None) -> list[Example]:
    """AG News articles as topic-classification instructions answered with the topic name."""
    rows = _take(load_rows(source, split, ("text", "label"), text=("text",)), limit)
    return [Example(AGNEWS_PROMPT.format(r["text"].strip()), _label(source, AGNEWS_LABELS, r["label"]), task="agnews") for r in rows]


def agnews_eval(source: str = "fancyzhx/ag_news", split: str = "test", limit: Optional[int] = None) -> list[EvalItem]:
    """AG News classification prompts with the gold topic as reference."""
    return [EvalItem(e.prompt, kind="agnews", reference=e.response, response=e.response) for e in agnews(source, split, limit)]


def _gsm8k_split(source: str, answer: str) -> tuple[str, str]:
    """(reasoning ending in "The final answer is: N", "N") from a GSM8K answer ending in "#### N"."""
    matches = list(GSM8K_FINAL.finditer(answer))
    require(bool(matches) and matches[-1].group(1) != "", f"{source}: gsm8k answer has no '#### N' final line: {answer[-60:]!r}")
    final = matches[-1]
    return f"{answer[: final.start()].rstrip()}\nThe final answer is: {final.group(1)}".lstrip(), final.group(1)


def gsm8k(source: str = "openai/gsm8k", split: str = "train", limit: Optional[int] = None, name: str = "main") -> list[Example]:
    """GSM8K problems with worked solutions that end in "The final answer is: N"."""
    rows = _take(load_rows(source, split, ("question", "answer"), name=name, text=("question", "answer")), limit)
    return [Example(r["question"], _gsm8k_split(source, r["answer"])[0], task="gsm8k") for r in rows]


def gsm8k_eval(source: str = "openai/gsm8k", split: str = "test", limit: Optional[int] = None, name: str = "main") -> list[EvalItem]:
    """GSM8K questions with the final number as reference."""
    rows = _take(load_rows(source, split, ("question", "answer"), name=name, text=("question", "answer")), limit)
    return [EvalItem(r["question"], kind="gsm8k", reference=final, response=worked)
            for r in rows for worked, final in [_gsm8k_split(source, r["answer"])]]


def _alpaca_prompt(row: dict) -> str:
    """The instruction, followed by its input on a new line when the input is not empty."""
    extra = (row["input"] or "").strip()
    return f"{row['instruction']}\n{extra}" if extra else row["instruction"]


def alpaca(source: str = "tatsu-lab/alpaca", split: str = "train", limit: Optional[int] = None) -> list[Example]:
    """Alpaca instructions (plus their input, when any, on a new line) with the reference output."""
    rows = _take(load_rows(source, split, ("instruction", "input", "output"), text=("instruction", "output")), limit)
    return [Example(_alpaca_prompt(r), r["output"], task="alpaca") for r in rows]


SOURCES: dict[str, Callable[..., list]] = {"beavertails": beavertails, "sst2": sst2, "agnews": agnews, "gsm8k": gsm8k, "alpaca": alpaca}
EVAL_SOURCES: dict[str, Callable[..., list[EvalItem]]] = {
    "beavertails": beavertails_eval,
    "sst2": sst2_eval,
    "agnews": agnews_eval,
    "gsm8k": gsm8k_eval,
    "xstest": xstest_eval,
}


def _lookup(registry: dict, kind: str, what: str) -> Callable[..., list]:
    """The converter for `kind`, or a UserError listing the known kinds."""
    require(kind in registry, f"unknown {what} kind {kind!r}; choose from {sorted(registry)}")
    return registry[kind]


def load_source(kind: str, source: str, **kw) -> list:
    """Training records of a named dataset kind from a hub id or local file."""
    return _lookup(SOURCES, kind, "dataset")(source, **kw)


def load_eval_source(kind: str, source: str, **kw) -> list[EvalItem]:
    """Evaluation items of a named dataset kind from a hub id or local file."""
    return _lookup(EVAL_SOURCES, kind, "eval dataset")(source, **kw)
