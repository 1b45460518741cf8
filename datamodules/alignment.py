"""Alignment data: harmful prompts paired with refusals (and harmful answers), plus benign data.

mode "sft": one stream of refusal and benign examples (plain safety alignment).
mode "triplets": each batch is {"harmful", "refusal", "benign"}: the paired harmful/refusal batches
share prompts by index, as SEAM-style defenses need.
"""
from __future__ import annotations

from typing import Optional

from immunize.datamodules.base import ListDataset, TokenizedData
from immunize.datamodules.catalog import Source, as_examples, load_records
from immunize.datamodules.records import Pair
from immunize.errors import UserError

MODES = ("sft", "triplets")


class AlignmentData(TokenizedData):
    """Safety-alignment data from paired records (see the module docstring).

    Args:
        pairs: paired harmful prompts (harmful answer + refusal): a toy "pairs" source or BeaverTails with refusals.
        benign: benign examples (replayed in "sft" mode; the third part of each triplet in "triplets" mode).
        mode: "sft" (one stream of refusals and benign examples) or "triplets" ({harmful, refusal, benign} batches).
        **kwargs: TokenizedData's arguments (template, max_length, batch_size, num_workers, seed).
    """

    def __init__(self, pairs: Source, benign: Optional[Source] = None, mode: str = "sft", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise UserError(f"unknown alignment mode {mode!r}; choose from {list(MODES)}")
        if mode == "triplets" and benign is None:
            raise UserError("alignment mode 'triplets' needs a benign source; set data.benign")
        self.pairs_source, self.benign_source, self.mode = pairs, benign, mode

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        pairs = load_records(self.pairs_source)
        if not all(isinstance(p, Pair) for p in pairs):
            raise UserError("alignment data needs paired records: set data.pairs.part to 'pairs' (or a beavertails file with a refusal field)")
        benign = as_examples(load_records(self.benign_source)) if self.benign_source else []
        if self.mode == "sft":
            rows = [self.encode(p.prompt, p.refusal) for p in pairs] + [self.encode(b.prompt, b.response) for b in benign]
        else:
            rows = [
                {"harmful": self.encode(p.prompt, p.harmful_response), "refusal": self.encode(p.prompt, p.refusal),
                 "benign": self.encode(benign[i % len(benign)].prompt, benign[i % len(benign)].response)}
                for i, p in enumerate(pairs)
            ]
        self.train_set = ListDataset(rows)

    def collate_triplets(self, rows):
        return {key: self.collate_examples([r[key] for r in rows]) for key in ("harmful", "refusal", "benign")}

    def train_dataloader(self):
        collate = self.collate_examples if self.mode == "sft" else self.collate_triplets
        return self.loader(self.train_set, collate, shuffle=True)
