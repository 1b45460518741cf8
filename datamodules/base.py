"""Shared plumbing: get the model's tokenizer, encode records, build seeded loaders."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from immunize.datamodules.collate import encode_example, pad_right
from immunize.datamodules.templates import TEMPLATE_NAMES
from immunize.errors import UserError


class ListDataset(Dataset):
    def __init__(self, rows: Sequence):
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class EpochSeededSampler(Sampler):
    """A shuffled order that depends only on (seed, epoch): a resumed fit sees the same order as an unbroken one."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + 1000003 * self.epoch)).tolist())

    def __len__(self) -> int:
        return self.length


class TokenizedData(L.LightningDataModule):
    """Base datamodule: records -> token ids with the model's tokenizer and the chosen prompt template.

    Args:
        template: prompt template: alpaca, qa ("Question: ... Answer:"), plain, or chat (the tokenizer's own).
        max_length: token limit of prompt + response.
        batch_size: rows per batch (per rank under DDP).
        num_workers: DataLoader workers.
        seed: the shuffle order (a pure function of seed and epoch, so resumed fits see the same order).
    """

    def __init__(self, template: str = "qa", max_length: int = 256, batch_size: int = 8, num_workers: int = 0, seed: int = 0):
        super().__init__()
        if template not in TEMPLATE_NAMES:
            raise UserError(f"unknown prompt template {template!r}; choose from {list(TEMPLATE_NAMES)}")
        for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 1),
                                 ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"data.{name} must be an integer >= {low}, got {value!r}")
        self.template, self.max_length, self.batch_size = template, max_length, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None

    def connect(self, tokenizer) -> None:
        """Use this tokenizer (the model's); called by setup when a trainer is attached."""
        self.tokenizer = tokenizer

    def _ensure_tokenizer(self):
        if self.tokenizer is None:
            module = getattr(self.trainer, "lightning_module", None) if self.trainer else None
            if module is None or getattr(module, "tokenizer", None) is None:
                raise UserError("datamodule has no tokenizer: attach it to a trainer with a CausalLMModule or call connect(tokenizer)")
            self.tokenizer = module.tokenizer
        return self.tokenizer

    def encode(self, prompt: str, response: str, system: Optional[str] = None) -> dict:
        return encode_example(self.tokenizer, self.template, prompt, response, self.max_length, system)

    def collate_examples(self, rows: Sequence[dict]) -> dict:
        return pad_right(rows, self.tokenizer.pad_token_id)

    def loader(self, dataset, collate: Callable, shuffle: bool, batch_size: Optional[int] = None) -> DataLoader:
        sampler = EpochSeededSampler(len(dataset), self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size or self.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=self.num_workers)
