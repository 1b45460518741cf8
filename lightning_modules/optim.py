"""Optimizer and learning-rate schedule built from plain config values."""
from __future__ import annotations

import math

import torch

from immunize.errors import UserError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def build_optimizer(params, name: str, lr: float, weight_decay: float, betas=(0.9, 0.999), momentum: float = 0.0):
    if lr <= 0 or not math.isfinite(lr):
        raise UserError(f"learning rate must be a positive number, got {lr}; set model.lr")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    raise UserError(f"unknown optimizer {name!r}; choose from {list(OPTIMIZERS)}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warmup, then constant or cosine to zero."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = int(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule))
