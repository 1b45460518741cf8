"""Evaluation metrics as torchmetrics Metrics (so they sum across DDP ranks) plus answer matching."""
from __future__ import annotations

import re
import string
from typing import Optional, Sequence, Union

import torch
from torchmetrics import Metric

from immunize.errors import UserError

MATCH_MODES = ("exact", "label", "final_number")
# Label words looked for in "label" mode besides the reference (sentiment and news-topic tasks).
DEFAULT_LABELS = ("positive", "negative", "neutral", "world", "sports", "business", "sci/tech", "tech")

_FINAL = re.compile(r"the\s+final\s+answer\s+is\s*:?", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_EOS = ("</s>", "<|endoftext|>", "<|eot_id|>", "<eos>")


def _normalise(text: str) -> str:
    """Lowercase, collapse whitespace, drop trailing EOS markers and punctuation (e.g. a trailing " .")."""
    text = " ".join((text or "").lower().split())
    changed = True
    while changed:
        before = text
        for eos in _EOS:
            if text.endswith(eos):
                text = text[: -len(eos)]
        text = text.rstrip(string.punctuation + " ")
        changed = text != before
    return text


def _first_label(prediction: str, labels: Sequence[str]) -> Optional[str]:
    """The label word occurring earliest in prediction (longest wins at a tie), matched at word boundaries."""
    best = None  # (position, -length, label)
    low = prediction.lower()
    for label in {lab.lower().strip() for lab in labels if lab and lab.strip()}:
        m = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", low)
        if m and (best is None or (m.start(), -len(label)) < best[:2]):
            best = (m.start(), -len(label), label)
    return None if best is None else best[2]


def _to_number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> Optional[float]:
    """The number after the last "the final answer is:", else the last number in text; None if there is none."""
    text = text or ""
    finals = list(_FINAL.finditer(text))
    if finals:
        m = _NUMBER.search(text, finals[-1].end())
        if m:
            return _to_number(m.group())
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def match_answer(mode: str, prediction: str, reference: str, labels: Optional[Sequence[str]] = None) -> bool:
    """Whether prediction answers reference under mode: "exact", "label" or "final_number".

    labels (label mode only) are the candidate label words; default DEFAULT_LABELS. The reference is always one.
    """
    prediction, reference = prediction or "", "" if reference is None else str(reference)
    if mode == "exact":
        return _normalise(prediction) == _normalise(reference)
    if mode == "label":
        ref = reference.strip().lower()
        if not ref:
            return False
        found = _first_label(prediction, list(DEFAULT_LABELS if labels is None else labels) + [ref])
        return found == ref
    if mode == "final_number":
        ref = _to_number(reference.strip())
        if ref is None:
            ref = extract_number(reference)
        pred = extract_number(prediction)
        return ref is not None and pred is not None and abs(pred - ref) <= 1e-6 * max(1.0, abs(ref))
    raise UserError(f"unknown match mode {mode!r}; choose from {list(MATCH_MODES)}")


def _index(names: Sequence[str], what: str) -> dict[str, int]:
    if len(set(names)) != len(names) or not names:
        raise UserError(f"{what}: need a non-empty list of distinct names, got {list(names)}")
    return {n: i for i, n in enumerate(names)}


class HarmfulScore(Metric):
    """Mean judge score as a percent, overall and per harm category; states are sums so DDP sync is exact.

    Items whose category is None count toward the overall score only. A NaN score (a language-model judge whose
    answer could not be parsed) is left out of every mean and counted instead: `judge/unparseable` (items) and
    `judge/unparseable_share` (% of the scored items), so a reader sees how many answers the score rests on.
    """

    full_state_update = False

    def __init__(self, categories: list[str], **kwargs):
        super().__init__(**kwargs)
        self.categories = list(categories)
        self._idx = _index(self.categories, "HarmfulScore categories")
        n = len(self.categories)
        self.add_state("sum", default=torch.zeros(n, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total_sum", default=torch.tensor(0.0, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("total_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unparseable", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Union[torch.Tensor, list[float]], categories: list[Optional[str]]) -> None:
        scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
        if scores.numel() != len(categories):
            raise UserError(f"HarmfulScore: {scores.numel()} scores but {len(categories)} categories")
        unknown = sorted({c for c in categories if c is not None and c not in self._idx})
        if unknown:
            raise UserError(f"HarmfulScore: unknown categories {unknown}; known: {self.categories}")
        parsed = ~torch.isnan(scores)
        keep = [i for i, c in enumerate(categories) if c is not None and bool(parsed[i])]
        idx = torch.tensor([self._idx[categories[i]] for i in keep], dtype=torch.long)
        device = self.sum.device
        self.sum.index_add_(0, idx.to(device), scores[keep].to(device))
        self.count.index_add_(0, idx.to(device), torch.ones(len(keep), dtype=torch.long, device=device))
        self.total_sum += scores[parsed].sum().to(device)
        self.total_count += int(parsed.sum())
        self.unparseable += int((~parsed).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"harmful_score": 100.0 * self.total_sum / self.total_count
               if self.total_count > 0 else torch.tensor(float("nan"))}
        for i, c in enumerate(self.categories):
            if self.count[i] > 0:
                out[f"harmful_score/{c}"] = 100.0 * self.sum[i] / self.count[i]
        if self.unparseable > 0:
            out["judge/unparseable"] = self.unparseable.float()
            out["judge/unparseable_share"] = 100.0 * self.unparseable / (self.unparseable + self.total_count)
        return out


class TaskAccuracy(Metric):
    """Per-task accuracy (percent) under each task's match mode, and "capability" = their mean over seen tasks."""

    full_state_update = False

    def __init__(self, tasks: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        bad = {t: m for t, m in tasks.items() if m not in MATCH_MODES}
        if bad:
            raise UserError(f"TaskAccuracy: unknown match modes {bad}; choose from {list(MATCH_MODES)}")
        self.tasks = dict(tasks)
        self._idx = _index(list(self.tasks), "TaskAccuracy tasks")
        n = len(self.tasks)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tasks: list[str], predictions: list[str], references: list[str]) -> None:
        if not len(tasks) == len(predictions) == len(references):
            raise UserError(f"TaskAccuracy: got {len(tasks)} tasks, {len(predictions)} predictions, "
                            f"{len(references)} references; need one each per item")
        unknown = sorted({t for t in tasks if t not in self._idx})
        if unknown:
            raise UserError(f"TaskAccuracy: unknown tasks {unknown}; known: {list(self.tasks)}")
        device = self.count.device
        idx = torch.tensor([self._idx[t] for t in tasks], dtype=torch.long, device=device)
        hits = torch.tensor([int(match_answer(self.tasks[t], p, r)) for t, p, r in zip(tasks, predictions, references)],
                            dtype=torch.long, device=device)
        self.count.index_add_(0, idx, torch.ones_like(idx))
        self.correct.index_add_(0, idx, hits)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for t, i in self._idx.items():
            if self.count[i] > 0:
                out[f"accuracy/{t}"] = 100.0 * self.correct[i].float() / self.count[i]
        out["capability"] = torch.stack(list(out.values())).mean() if out else torch.tensor(float("nan"))
        return out


class KeyedMean(Metric):
    """Mean of a per-item value for each key (e.g. the teacher-forced loss per task), as `<prefix><key>`.

    States are sums and counts, so the DDP sync is exact; keys with no item are left out of compute().
    """

    full_state_update = False

    def __init__(self, keys: Sequence[str], prefix: str, **kwargs):
        super().__init__(**kwargs)
        self.keys, self.prefix = list(keys), prefix
        self._idx = _index(self.keys, f"KeyedMean {prefix!r} keys")
        self.add_state("sum", default=torch.zeros(len(self.keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(len(self.keys), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, keys: list[str], values: Union[torch.Tensor, list[float]]) -> None:
        values = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
        if values.numel() != len(keys):
            raise UserError(f"KeyedMean: {values.numel()} values but {len(keys)} keys")
        unknown = sorted({k for k in keys if k not in self._idx})
        if unknown:
            raise UserError(f"KeyedMean: unknown keys {unknown}; known: {self.keys}")
        idx = torch.tensor([self._idx[k] for k in keys], dtype=torch.long, device=self.sum.device)
        self.sum.index_add_(0, idx, values.to(self.sum.device))
        self.count.index_add_(0, idx, torch.ones_like(idx))

    def compute(self) -> dict[str, torch.Tensor]:
        return {f"{self.prefix}{k}": (self.sum[i] / self.count[i]).float() for k, i in self._idx.items() if self.count[i] > 0}
