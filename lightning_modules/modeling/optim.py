"""Optimizer and learning-rate schedule built from plain config values."""
from __future__ import annotations

import math

import torch

from immunize.errors import UserError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_training_args(optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                        betas=(0.9, 0.999), momentum: float = 0.0, scheduler: str = "constant",
                        warmup_ratio: float = 0.0) -> None:
    """Every optimizer and schedule value in range, or a one-line UserError naming the model.* key (called by the
    module's constructor and by the bench's validation, before any work)."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {optimizer!r}; choose from {list(OPTIMIZERS)} (model.optimizer)")
    if scheduler not in SCHEDULES:
        raise UserError(f"unknown schedule {scheduler!r}; choose from {list(SCHEDULES)} (model.scheduler)")
    if not _number(lr) or lr <= 0:
        raise UserError(f"learning rate must be a positive number, got {lr}; set model.lr")
    if not _number(weight_decay) or weight_decay < 0:
        raise UserError(f"model.weight_decay must be >= 0, got {weight_decay}")
    if not _number(momentum) or not 0 <= momentum < 1:
        raise UserError(f"model.momentum must be in [0, 1), got {momentum}")
    if len(tuple(betas)) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
        raise UserError(f"model.betas must be two numbers in [0, 1), got {betas}")
    if not _number(warmup_ratio) or not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"model.warmup_ratio must be in [0, 1), got {warmup_ratio}")


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
