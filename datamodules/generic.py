"""Source kind "generic": any hub dataset or local .json/.jsonl/.parquet/.csv file, read through a field map.

`fields` maps a record field to the file's column, e.g. {prompt: question, response: answer, category: topic}.
Record fields:
    prompt     the request (text; always needed)
    response   the answer trained on (harmful/benign parts, the harmful answer of a pair; text)
    refusal    the refusal of a pair (part pairs; text)
    category   the harm category: any string (or a BeaverTails-style {name: bool} dict: its first true name)
    is_safe    a row flag: harmful and pairs parts keep the unsafe rows, benign and over_refusal the safe ones
    label      the gold answer of a benign evaluation item (its reference); a benign training example without a
               response trains on it
A field left out of the map reads the column of its own name when the file has one. Parts: harmful, benign and
pairs for training; harmful, benign and over_refusal for evaluation (benign items are graded by their task's
answer-matching rule: name it in EvalData's task_match).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from immunize.datamodules.records import OVER_REFUSAL, EvalItem, Example, Pair
from immunize.errors import UserError

FIELDS = ("prompt", "response", "refusal", "category", "is_safe", "label")
TEXT_FIELDS = ("prompt", "response", "refusal")
TRAIN_PARTS = ("harmful", "benign", "pairs")
EVAL_PARTS = ("harmful", "benign", "over_refusal")
NEEDS = {  # (record fields every row must have, alternatives of which one is needed)
    ("train", "harmful"): (("prompt", "response"), ()),
    ("train", "pairs"): (("prompt", "response", "refusal"), ()),
    ("train", "benign"): (("prompt",), ("response", "label")),
    ("eval", "harmful"): (("prompt",), ()),
    ("eval", "benign"): (("prompt",), ("label", "response")),
    ("eval", "over_refusal"): (("prompt",), ()),
}
KEEP_SAFE = {"harmful": False, "pairs": False, "benign": True, "over_refusal": True}  # which rows an is_safe flag keeps


def check_fields(fields: Optional[Mapping[str, Any]], what: str) -> dict[str, str]:
    """The field map as {record field: column}, or a one-line UserError for an unknown key or a non-text column."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise UserError(f"{what}: fields must be a mapping {{record field: column}}, e.g. {{prompt: question, "
                        f"response: answer}}, got {type(fields).__name__}")
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise UserError(f"{what}: fields has unknown key {unknown[0]!r}; the record fields are {', '.join(FIELDS)}")
    bad = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"{what}: fields.{bad[0]} must name a column of the file, got {fields[bad[0]]!r}")
    return dict(fields)


def _columns(path: str, rows: list[dict], fields: dict[str, str], stage: str, part: str) -> dict[str, str]:
    """{record field: column} of every field this part reads, checked against the file's columns."""
    needed, alternatives = NEEDS[(stage, part)]
    have = list(rows[0]) if rows else []
    shown = f"the file has fields: {', '.join(have) or '(none)'}"
    missing = [f"{fields.get(k, k)!r} (fields.{k})" for k in needed if fields.get(k, k) not in have]
    missing += [f"{fields[k]!r} (fields.{k})" for k in fields if k not in needed and fields[k] not in have]
    if missing:
        raise UserError(f"{path}: missing field {', '.join(missing)} for part {part!r}; {shown}; map the record "
                        "fields to its columns with `fields`")
    mapping = {k: fields.get(k, k) for k in FIELDS if fields.get(k, k) in have}
    if alternatives and not any(k in mapping for k in alternatives):
        raise UserError(f"{path}: part {part!r} needs a {' or '.join(alternatives)} field and the file has neither "
                        f"({shown}); set fields.{alternatives[0]}")
    return mapping


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "safe")
    return bool(value)


def _category(value: Any) -> Optional[str]:
    """Free-form category text; a {name: bool} dict gives its first true name; empty or null gives None."""
    if isinstance(value, dict):
        return next((str(k) for k, flag in value.items() if _flag(flag)), None)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _rows(path: str, split: Optional[str], fields: Optional[Mapping[str, Any]], stage: str, part: str,
          what: str) -> tuple[list[dict], dict[str, str]]:
    """The file's rows (those of the part's kind when it has an is_safe field) and the part's column map."""
    from immunize.datamodules.sources import check_text, load_rows

    parts = TRAIN_PARTS if stage == "train" else EVAL_PARTS
    if part not in parts:
        raise UserError(f"{what}: unknown part {part!r} for a generic {'training' if stage == 'train' else 'evaluation'}"
                        f" source; choose from {list(parts)}")
    fields = check_fields(fields, what)
    rows = load_rows(path, split or "train")
    mapping = _columns(path, rows, fields, stage, part)
    text = [k for k in TEXT_FIELDS if k in NEEDS[(stage, part)][0]]
    if (stage, part) == ("train", "benign") and "response" in mapping:
        text.append("response")  # the answer trained on
    check_text(path, rows, tuple(mapping[k] for k in text))
    if "is_safe" in mapping:
        rows = [r for r in rows if _flag(r[mapping["is_safe"]]) == KEEP_SAFE[part]]
    return rows, mapping


def _task(path: str, task: Optional[str]) -> str:
    return task or Path(path).stem or path


def _answer(row: dict, mapping: dict[str, str], order: tuple[str, str]) -> Optional[str]:
    key = next((k for k in order if k in mapping), None)
    value = None if key is None else row[mapping[key]]
    return None if value is None else str(value)


def records(path: str, part: str = "harmful", fields: Optional[Mapping[str, Any]] = None, split: Optional[str] = None,
            task: Optional[str] = None, what: str = "generic source") -> list:
    """Training records: Examples (part harmful or benign) or Pairs (part pairs), in the file's order."""
    rows, m = _rows(path, split, fields, "train", part, what)
    cat = (lambda r: _category(r[m["category"]])) if "category" in m else (lambda r: None)
    if part == "pairs":
        return [Pair(r[m["prompt"]], r[m["response"]], r[m["refusal"]], cat(r)) for r in rows]
    if part == "harmful":
        return [Example(r[m["prompt"]], r[m["response"]], cat(r), True, task or "harmful") for r in rows]
    name = _task(path, task)
    return [Example(r[m["prompt"]], _answer(r, m, ("response", "label")), cat(r), False, name) for r in rows]


def eval_items(path: str, part: str = "harmful", fields: Optional[Mapping[str, Any]] = None,
               split: Optional[str] = None, task: Optional[str] = None,
               what: str = "generic source") -> list[EvalItem]:
    """Evaluation items: harmful prompts (each prompt once, with its category), benign task items (kind = the task
    name, reference = the label, else the response) or over-refusal prompts."""
    rows, m = _rows(path, split, fields, "eval", part, what)
    cat = (lambda r: _category(r[m["category"]])) if "category" in m else (lambda r: None)
    if part == "benign":
        name = _task(path, task)
        return [EvalItem(r[m["prompt"]], name, reference=_answer(r, m, ("label", "response")), category=cat(r),
                         response=_answer(r, m, ("response", "label"))) for r in rows]
    if part == "over_refusal":
        return [EvalItem(r[m["prompt"]], OVER_REFUSAL, category=cat(r)) for r in rows]
    seen: set[str] = set()
    items = []
    for r in rows:
        if r[m["prompt"]] not in seen:
            seen.add(r[m["prompt"]])
            items.append(EvalItem(r[m["prompt"]], "harmful", category=cat(r), response=_answer(r, m, ("response",))))
    return items
