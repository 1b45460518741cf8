"""A user's fine-tuning set: a benign task with a fraction p of harmful samples mixed in."""
from __future__ import annotations

import random
from typing import Optional

from datamodules.base import ListDataset, TokenizedData
from datamodules.catalog import Source, as_examples, load_records
from datamodules.records import Example
from immunize.errors import UserError


def mix(benign: list[Example], harmful: list[Example], n: int, p: float, seed: int,
        exclude_prompts: frozenset = frozenset()) -> list[Example]:
    """round(p*n) harmful + the rest benign, drawn without replacement and shuffled with `seed`."""
    if not 0.0 <= p <= 1.0:
        raise UserError(f"harmful ratio p must be in [0, 1], got {p}; set data.p")
    if n < 1:
        raise UserError(f"mix size n must be >= 1, got {n}; set data.n")
    harmful = [h for h in harmful if h.prompt not in exclude_prompts]
    n_harm = int(round(p * n))
    n_benign = n - n_harm
    if n_harm > len(harmful):
        raise UserError(f"HarmfulMix needs {n_harm} harmful samples but the source has {len(harmful)} usable; lower n or p")
    if n_benign > len(benign):
        raise UserError(f"HarmfulMix needs {n_benign} benign samples but the source has {len(benign)}; lower n")
    rng = random.Random(seed)
    rows = rng.sample(harmful, n_harm) + rng.sample(benign, n_benign)
    rng.shuffle(rows)
    return rows


class HarmfulMix(TokenizedData):
    """n samples of `benign` with a fraction p from `harmful`; harmful prompts found in `exclude` are dropped.

    `exclude` lists the evaluation and alignment/defense sources, so no attack sample leaks into them.

    Args:
        benign: the user's task data.
        harmful: where the harmful samples come from.
        n: size of the mix.
        p: harmful ratio (round(p * n) harmful samples).
        exclude: sources whose prompts must not appear among the harmful samples.
        **kwargs: TokenizedData's arguments (template, max_length, batch_size, num_workers, seed).
    """

    def __init__(self, benign: Source, harmful: Source, n: int = 1000, p: float = 0.1,
                 exclude: Optional[list[Source]] = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= p <= 1.0:
            raise UserError(f"harmful ratio p must be in [0, 1], got {p}; set data.p")
        self.benign, self.harmful, self.n, self.p, self.exclude = benign, harmful, n, p, exclude or []

    def records(self) -> list[Example]:
        excluded = frozenset(r.prompt for src in self.exclude for r in load_records(src))
        harmful = as_examples(load_records(self.harmful), "harmful")
        return mix(as_examples(load_records(self.benign)), harmful, self.n, self.p, self.seed, excluded)

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        self.train_set = ListDataset([self.encode(e.prompt, e.response) for e in self.records()])

    def train_dataloader(self):
        return self.loader(self.train_set, self.collate_examples, shuffle=True)
