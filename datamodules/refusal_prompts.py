"""Harmful and harmless prompts for the refusal direction (Arditi et al. 2024; andyrdt/refusal_direction
pipeline/run_pipeline.py): a training set (the difference in means) and a validation set (the direction's selection)
of each side, drawn without overlap, and what the template puts after the instruction (the positions the direction is
read at).
"""
from __future__ import annotations

import random
from typing import Optional, Sequence

import torch

from immunize.datamodules.base import ListDataset, TokenizedData
from immunize.datamodules.catalog import Source, as_examples, load_records
from immunize.datamodules.collate import encode_prompt, pad_left
from immunize.datamodules.templates import format_prompt
from immunize.errors import UserError

PLACEHOLDER = "{prompt}"


def post_instruction_count(tokenizer, template: str, encoded: Sequence[Sequence[int]]) -> int:
    """How many tokens the template puts after the instruction (the reference's end-of-instruction tokens): the
    template's text after the request, tokenized, counted as far as every encoded prompt ends with it. 0 when the
    template puts nothing there (then the direction is read at the last prompt position)."""
    suffix = format_prompt(template, PLACEHOLDER, tokenizer).split(PLACEHOLDER)[-1]
    ids = tokenizer(suffix, add_special_tokens=False).input_ids if suffix.strip() else []
    for k in range(len(ids), 0, -1):
        if all(len(row) > k and list(row[-k:]) == ids[-k:] for row in encoded):
            return k
    return 0


def default_refusal_words(tokenizer) -> list[str]:
    """The words a refusal starts with: for the toy world's tokenizer the first word of each of its refusals; for any
    other, "I" (the reference's refusal token for Llama, Gemma and Yi)."""
    from immunize.datamodules.toy.lexicon import REFUSALS
    from immunize.datamodules.toy.tokenizer import build_toy_tokenizer

    if tokenizer.get_vocab() == build_toy_tokenizer().get_vocab():
        return sorted({refusal.split()[0] for refusal in REFUSALS})
    return ["I"]


def _unique_prompts(source: Source, excluded: frozenset) -> list[str]:
    return list(dict.fromkeys(e.prompt for e in as_examples(load_records(source)) if e.prompt not in excluded))


class RefusalDirectionData(TokenizedData):
    """Harmful and harmless prompts for refusal-direction ablation: `n_train` of each side for the difference in
    means (the training batches, left-padded, with an `is_harmful` flag per row) and `n_val` of each side, disjoint
    from them, for selecting the direction (`selection_prompts`). Draws are seeded (`seed`).

    Args:
        harmful: harmful prompts (toy: {kind: toy, part: harmful, split: attack}; real: a BeaverTails-format file).
        harmless: harmless prompts (toy: benign task prompts, {kind: toy, part: benign, split: finetune}; real: an
            Alpaca-format source, as the reference's).
        n_train: prompts of each side for the difference in means (the reference's 128).
        n_val: prompts of each side for the selection (the reference's 32).
        exclude: sources whose prompts are never drawn (the evaluation set).
        **kwargs: TokenizedData's arguments (template, max_length, batch_size (default 32), num_workers, seed
            (default 42, the reference's)).
    """

    def __init__(self, harmful: Source, harmless: Source, n_train: int = 128, n_val: int = 32,
                 exclude: Optional[list[Source]] = None, **kwargs):
        kwargs.setdefault("batch_size", 32)
        kwargs.setdefault("seed", 42)
        super().__init__(**kwargs)
        for name, value, low in (("n_train", n_train, 1), ("n_val", n_val, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"data.{name} must be an integer >= {low}, got {value!r}")
        self.harmful, self.harmless, self.n_train, self.n_val = harmful, harmless, n_train, n_val
        self.exclude = exclude or []
        self._drawn: Optional[dict[str, list[str]]] = None

    def prompts(self) -> dict[str, list[str]]:
        """{"harmful_train", "harmful_val", "harmless_train", "harmless_val"}: the drawn prompts (drawn once)."""
        if self._drawn is None:
            excluded = frozenset(r.prompt for src in self.exclude for r in load_records(src))
            drawn = {}
            for side, source in (("harmful", self.harmful), ("harmless", self.harmless)):
                pool = _unique_prompts(source, excluded)
                need = self.n_train + self.n_val
                if len(pool) < need:
                    raise UserError(f"the refusal direction needs {need} distinct {side} prompts (data.n_train + "
                                    f"data.n_val) but data.{side} has {len(pool)} usable; lower them or give more "
                                    "prompts")
                picked = random.Random(f"{self.seed}:{side}").sample(pool, need)
                drawn[f"{side}_train"], drawn[f"{side}_val"] = picked[:self.n_train], picked[self.n_train:]
            self._drawn = drawn
        return self._drawn

    def encode_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        return [encode_prompt(self.tokenizer, self.template, p)[-self.max_length:] for p in prompts]

    def post_instruction_count(self) -> int:
        """Tokens the template puts after the instruction (post_instruction_count over every drawn prompt)."""
        self._ensure_tokenizer()
        drawn = self.prompts()
        encoded = [ids for key in ("harmful_train", "harmless_train") for ids in self.encode_prompts(drawn[key])]
        return post_instruction_count(self.tokenizer, self.template, encoded)

    def selection_prompts(self) -> dict[str, list[list[int]]]:
        """{"harmful", "harmless"}: the validation prompts, encoded."""
        self._ensure_tokenizer()
        return {side: self.encode_prompts(self.prompts()[f"{side}_val"]) for side in ("harmful", "harmless")}

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        drawn = self.prompts()
        self.train_set = ListDataset([(ids, side == "harmful") for side in ("harmful", "harmless")
                                      for ids in self.encode_prompts(drawn[f"{side}_train"])])

    def collate_prompts(self, rows) -> dict:
        batch = pad_left([ids for ids, _ in rows], self.tokenizer.pad_token_id)
        batch["is_harmful"] = torch.tensor([flag for _, flag in rows], dtype=torch.bool)
        return batch

    def train_dataloader(self):
        return self.loader(self.train_set, self.collate_prompts, shuffle=False)
