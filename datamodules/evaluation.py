"""Evaluation data: harmful prompts by category and benign task items with gold answers."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch.utils.data import DataLoader

from immunize.datamodules.base import ListDataset, TokenizedData
from immunize.datamodules.catalog import Source, load_eval_items
from immunize.datamodules.collate import encode_prompt, pad_left
from immunize.datamodules.identity_shift import IDENTITY_SHIFT
from immunize.datamodules.jailbreak_formats import JAILBREAK_FORMATS
from immunize.datamodules.prompt_formats import pick_format, rendering_of
from immunize.datamodules.records import OVER_REFUSAL, EvalItem, Example
from immunize.errors import UserError

# How each benign task's answers are matched (toy tasks and the real datasets).
TASK_MATCH = {"sentiment": "label", "topic": "label", "arithmetic": "final_number", "facts": "exact", "howto": "exact",
              "sst2": "label", "agnews": "label", "gsm8k": "final_number", "alpaca": "exact"}


class EvalData(TokenizedData):
    """Items from `sources`; batches carry left-padded prompt ids, the items, and their gold responses encoded for
    the teacher-forced loss.

    Args:
        sources: evaluation sources (default: the toy world's eval split).
        n_harmful_per_category: harmful prompts kept per harm category.
        n_per_task: benign items kept per task.
        n_over_refusal: toy sources: benign requests in harmful vocabulary added (over-refusal is measured on them
            and on every xstest source's items).
        task_match: answer-matching rule per task (exact, label or final_number), merged over the defaults.
        prompt_format: a prompt format wrapped around every harmful prompt the model sees: a jailbreak format of
            immunize.datamodules.jailbreak_formats (skeleton, suppression, formal, neutral, year, paragraph: the one
            the attack trained with) or identity_shift (the obedient-agent system prompt and instruction prefix); in
            the toy world's words for toy sources. Judges still read the original request; benign and over-refusal
            items stay plain; null: none.
        **kwargs: TokenizedData's arguments (template, max_length, batch_size (default 64), num_workers, seed).
    """

    def __init__(self, sources: Optional[list[Source]] = None, n_harmful_per_category: int = 20, n_per_task: int = 50,
                 n_over_refusal: int = 0, task_match: Optional[dict[str, str]] = None,
                 prompt_format: Optional[str] = None, **kwargs):
        kwargs.setdefault("batch_size", 64)
        super().__init__(**kwargs)
        self.sources = sources or [Source(kind="toy")]
        for name, value in (("n_harmful_per_category", n_harmful_per_category), ("n_per_task", n_per_task),
                            ("n_over_refusal", n_over_refusal)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"data.{name} must be an integer >= 0, got {value!r} (0 takes none)")
        self.n_harmful_per_category, self.n_per_task, self.n_over_refusal = n_harmful_per_category, n_per_task, n_over_refusal
        self.task_match = {**TASK_MATCH, **(task_match or {})}
        self.prompt_format = pick_format(prompt_format, {**JAILBREAK_FORMATS, IDENTITY_SHIFT.name: IDENTITY_SHIFT},
                                         "data.prompt_format")
        self._sourced: Optional[list[tuple[EvalItem, str]]] = None

    def sourced_items(self) -> list[tuple[EvalItem, str]]:
        """(item, rendering of its source) for every evaluation item, in order; read once, so every call returns the
        same item objects."""
        if self._sourced is None:
            items = [(it, rendering_of(src)) for src in self.sources
                     for it in load_eval_items(src, self.n_harmful_per_category, self.n_per_task, self.n_over_refusal)]
            if not items:
                raise UserError("evaluation set is empty; check data.sources and the n_* limits")
            self._sourced = items
        return self._sourced

    def items(self) -> list:
        return [it for it, _ in self.sourced_items()]

    def model_view(self, item: EvalItem, rendering: str = "real") -> Example:
        """What the model is given for an item: its prompt (and system prompt) and its gold response, in
        data.prompt_format for a harmful item."""
        plain = Example(item.prompt, item.response or "")
        if self.prompt_format is None or item.kind != "harmful":
            return plain
        return self.prompt_format.render(plain, rendering)

    def eval_spec(self) -> tuple[list[str], dict[str, str]]:
        """(harm categories, {task: match mode}) present in the evaluation set, in first-seen order."""
        items = self.items()
        cats = list(dict.fromkeys(it.category or "unknown" for it in items if it.kind == "harmful"))
        tasks = list(dict.fromkeys(it.kind for it in items if it.kind not in ("harmful", OVER_REFUSAL)))
        unknown = [t for t in tasks if t not in self.task_match]
        if unknown:
            raise UserError(f"no answer-matching rule for task {unknown[0]!r}; add it to data.task_match (exact|label|final_number)")
        return cats, {t: self.task_match[t] for t in tasks}

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        rows = []
        for it, rendering in self.sourced_items():
            view = self.model_view(it, rendering)
            rows.append((encode_prompt(self.tokenizer, self.template, view.prompt, view.system), it,
                         self._gold(it, rendering)))
        self.eval_set = ListDataset(rows)

    def _gold(self, item, rendering: str = "real") -> Optional[dict]:
        """The item's prompt + gold response as the model sees them, encoded for a teacher-forced loss (None without a
        gold response)."""
        if item.response is None:
            return None
        view = self.model_view(item, rendering)
        return self.encode(view.prompt, view.response, view.system)

    def gold_batch(self, items, limit: int) -> Optional[dict]:
        """The first `limit` of `items` that have a gold response, right-padded (for gradient diagnostics)."""
        renderings = {id(it): r for it, r in self.sourced_items()} if self.prompt_format is not None else {}
        rows = [self._gold(it, renderings.get(id(it), "real")) for it in items if it.response is not None][:limit]
        return self.collate_examples(rows) if rows else None

    def collate_items(self, rows):
        batch = pad_left([r[0] for r in rows], self.tokenizer.pad_token_id)
        batch["items"] = [r[1] for r in rows]
        gold = [i for i, r in enumerate(rows) if r[2] is not None]
        if gold:
            batch["gold"] = self.collate_examples([rows[i][2] for i in gold])
            batch["gold_index"] = gold
        return batch

    def test_dataloader(self):
        """Under DDP each rank gets a disjoint shard with no padded repeats, so every item counts once."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(self.eval_set, shuffle=False)
            return DataLoader(self.eval_set, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_items,
                              num_workers=self.num_workers)
        return self.loader(self.eval_set, self.collate_items, shuffle=False)

    def predict_dataloader(self):
        return self.test_dataloader()
