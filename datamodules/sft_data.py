"""Plain supervised fine-tuning data: the union of one or more sources."""
from __future__ import annotations

from typing import Optional

from immunize.datamodules.base import ListDataset, TokenizedData
from immunize.datamodules.catalog import Source, as_examples, load_records
from immunize.datamodules.collate import checked_loss_on, supervise
from immunize.datamodules.jailbreak_formats import JAILBREAK_FORMATS
from immunize.datamodules.prompt_formats import pick_format, rendering_of
from immunize.errors import UserError


class SFTData(TokenizedData):
    """Train on every example of `train` (pairs contribute their `pairs_use` side); optional `val` for loss.

    Args:
        train: the training sources (concatenated).
        val: validation sources (their loss is logged as val/loss).
        pairs_use: which side of paired records to train on: "harmful" or "refusal".
        loss_on: the positions the training loss covers: "response" (ours), "sequence" (prompt and response), or
            "all" (padding too: what the SEAM and Panacea reference attacks train on, through Hugging Face's
            collator). Validation loss stays on the response, so val/loss compares across protocols.
        jailbreak_format: a format of immunize.datamodules.jailbreak_formats (skeleton, suppression, formal, neutral,
            year, paragraph) wrapped around every harmful example of `train` and `val` (jailbreak-tuning; refusals
            and benign examples stay plain), in the toy world's words for toy sources; null: none.
        **kwargs: TokenizedData's arguments (template, max_length, batch_size, num_workers, seed).
    """

    def __init__(self, train: list[Source], val: Optional[list[Source]] = None, pairs_use: str = "harmful",
                 loss_on: str = "response", jailbreak_format: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        if not train:
            raise UserError("data.train lists no sources, so there is nothing to train on; give at least one source")
        if pairs_use not in ("harmful", "refusal"):
            raise UserError(f"data.pairs_use must be 'harmful' or 'refusal', got {pairs_use!r}")
        self.train_sources, self.val_sources, self.pairs_use = train, val or [], pairs_use
        self.loss_on = checked_loss_on(loss_on)
        self.jailbreak_format = pick_format(jailbreak_format, JAILBREAK_FORMATS, "data.jailbreak_format")

    def examples(self, sources: list[Source]) -> list:
        out = []
        for src in sources:
            rows = as_examples(load_records(src), self.pairs_use)
            if self.jailbreak_format is not None:
                rows = [self.jailbreak_format.render(e, rendering_of(src)) if e.is_harmful else e for e in rows]
            out += rows
        return out

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        self.train_set = ListDataset([self.encode(e.prompt, e.response, e.system)
                                      for e in self.examples(self.train_sources)])
        self.val_set = ListDataset([self.encode(e.prompt, e.response, e.system)
                                    for e in self.examples(self.val_sources)]) if self.val_sources else None

    def train_dataloader(self):
        return self.loader(self.train_set, self.collate_train, shuffle=True)

    def collate_train(self, rows) -> dict:
        return supervise(self.collate_examples(rows), self.loss_on)

    def val_dataloader(self):
        return self.loader(self.val_set, self.collate_examples, shuffle=False) if self.val_set is not None else []
