"""Seeded, per-rank batches drawn from a method's own encoded rows (a defense's harmful answers, TAR's adversary).

Batch k of rank r is a pure function of (seed, k, r, world size): a resumed fit draws what an unbroken one would,
and every rank's share of the global batch is disjoint.
"""
from __future__ import annotations

from typing import Sequence

import torch

from immunize.datamodules.catalog import Source, as_examples, load_records
from immunize.datamodules.collate import encode_example, pad_right


def draw_indices(n: int, batch_size: int, draw: int, rank: int, world: int, seed: int) -> list[int]:
    """Row indices of batch `draw` on `rank`: an endless stream of seeded permutations of range(n), cut into
    consecutive batches, rank r taking the r-th batch of each group of `world`."""
    start = (draw * world + rank) * batch_size
    out, cache = [], {}
    for pos in range(start, start + batch_size):
        cycle = pos // n
        if cycle not in cache:
            cache[cycle] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + cycle)).tolist()
        out.append(cache[cycle][pos % n])
    return out


def encode_source(source: Source, use: str, tokenizer, template: str, max_length: int) -> list[dict]:
    """The records of `source` (Pairs give their `use` side: "harmful" answer or "refusal"), encoded for training."""
    examples = as_examples(load_records(source), use)
    return [encode_example(tokenizer, template, e.prompt, e.response, max_length) for e in examples]


def split_rows(rows: Sequence[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(kept, held out): a seeded permutation of the rows, the last round(len * heldout_fraction) held out (at least
    one of each when heldout_fraction > 0 and there are two rows or more)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_out = round(len(rows) * heldout_fraction)
    if heldout_fraction > 0 and len(rows) >= 2:
        n_out = min(max(n_out, 1), len(rows) - 1)
    kept, out = order[:len(rows) - n_out], order[len(rows) - n_out:]
    return [rows[i] for i in kept], [rows[i] for i in out]


def drawn_batch(rows: Sequence[dict], batch_size: int, draw: int, rank: int, world: int, seed: int, pad_id: int,
                device=None) -> dict:
    """Batch `draw` of `rank` (draw_indices), right-padded, on `device`."""
    idx = draw_indices(len(rows), batch_size, draw, rank, world, seed)
    batch = pad_right([rows[i] for i in idx], pad_id)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
