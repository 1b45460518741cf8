"""Named parts of a triplet batch ({"harmful", "refusal", "benign"} from AlignmentData mode "triplets")."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from immunize.errors import UserError


def require_parts(batch, names: tuple[str, ...], method: str) -> tuple[dict, ...]:
    """The batch's parts `names` in order, or a UserError that says which data module and mode to use."""
    missing = [k for k in names if k not in batch] if isinstance(batch, dict) else list(names)
    if missing:
        raise UserError(f"{method} needs batches with parts {list(names)} (immunize.datamodules.AlignmentData with "
                        f"mode: triplets); missing {missing}")
    return tuple(batch[k] for k in names)


def batch_size(batch: dict) -> int:
    """Rows of a plain batch, or of the first part of a batch of parts."""
    part = batch if "input_ids" in batch else next(iter(batch.values()))
    return int(part["input_ids"].shape[0])


def concat_parts(parts: Sequence[dict], pad_id: int) -> dict:
    """Right-padded batch parts stacked into one batch, each right-padded to the widest (attention 0, label -100)."""
    width = max(int(p["input_ids"].shape[1]) for p in parts)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
    out = {}
    for key, value in fill.items():
        if all(key in p for p in parts):
            out[key] = torch.cat([F.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in parts])
    return out
