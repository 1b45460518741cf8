"""A user's fine-tuning set: a benign task with a fraction p of harmful samples mixed in."""
from __future__ import annotations

import random
from typing import Optional

from immunize.datamodules.base import ListDataset, TokenizedData
from immunize.datamodules.catalog import Source, as_examples, load_records
from immunize.datamodules.collate import checked_loss_on, supervise
from immunize.datamodules.jailbreak_formats import JAILBREAK_FORMATS
from immunize.datamodules.prompt_formats import pick_format, rendering_of
from immunize.datamodules.records import Example
from immunize.errors import UserError


def mix_counts(n: int, p: float) -> tuple[int, int]:
    """(harmful, benign) sample counts of a mix: round(p*n) and the rest. A UserError for p outside [0, 1], n < 1,
    or a rounding that empties a part the ratio asks for (0 < p < 1 with no harmful or no benign sample left)."""
    if not 0.0 <= p <= 1.0:
        raise UserError(f"harmful ratio p must be in [0, 1], got {p}; set data.p")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"mix size n must be an integer >= 1, got {n!r}; set data.n")
    n_harm = int(round(p * n))
    n_benign = n - n_harm
    if p > 0 and n_harm == 0:
        need = int(0.5 / p)
        while round(p * need) == 0:
            need += 1
        raise UserError(f"harmful ratio p={p} of n={n} rounds to 0 harmful samples; raise n to at least {need} or "
                        "set p=0 for a benign-only mix")
    if p < 1 and n_benign == 0:
        raise UserError(f"harmful ratio p={p} of n={n} rounds to 0 benign samples; raise n or set p=1 for a "
                        "harmful-only mix")
    return n_harm, n_benign


def mix(benign: list[Example], harmful: list[Example], n: int, p: float, seed: int,
        exclude_prompts: frozenset = frozenset()) -> list[Example]:
    """round(p*n) harmful + the rest benign, drawn without replacement and shuffled with `seed`."""
    n_harm, n_benign = mix_counts(n, p)
    harmful = [h for h in harmful if h.prompt not in exclude_prompts]
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
        loss_on: the positions the training loss covers (as SFTData's): "response" (ours), "sequence" or "all"
            (Panacea's reference fine-tune, through Hugging Face's collator).
        jailbreak_format: a format of immunize.datamodules.jailbreak_formats (skeleton, suppression, formal, neutral,
            year, paragraph) wrapped around the harmful samples (jailbreak-tuning; the benign ones stay plain), in
            the toy world's words for a toy harmful source; null: none.
        **kwargs: TokenizedData's arguments (template, max_length, batch_size, num_workers, seed).
    """

    def __init__(self, benign: Source, harmful: Source, n: int = 1000, p: float = 0.1,
                 exclude: Optional[list[Source]] = None, loss_on: str = "response",
                 jailbreak_format: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        mix_counts(n, p)
        self.benign, self.harmful, self.n, self.p, self.exclude = benign, harmful, n, p, exclude or []
        self.loss_on = checked_loss_on(loss_on)
        self.jailbreak_format = pick_format(jailbreak_format, JAILBREAK_FORMATS, "data.jailbreak_format")

    def records(self) -> list[Example]:
        excluded = frozenset(r.prompt for src in self.exclude for r in load_records(src))
        harmful = as_examples(load_records(self.harmful), "harmful")
        rows = mix(as_examples(load_records(self.benign)), harmful, self.n, self.p, self.seed, excluded)
        if self.jailbreak_format is None:
            return rows
        drawn = {id(h) for h in harmful}  # the mix holds the harmful source's own objects
        rendering = rendering_of(self.harmful)
        return [self.jailbreak_format.render(r, rendering) if id(r) in drawn else r for r in rows]

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        self.train_set = ListDataset([self.encode(e.prompt, e.response, e.system) for e in self.records()])

    def train_dataloader(self):
        return self.loader(self.train_set, self.collate_train, shuffle=True)

    def collate_train(self, rows) -> dict:
        return supervise(self.collate_examples(rows), self.loss_on)
