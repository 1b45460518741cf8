"""Optimizer and learning-rate schedule built from plain config values."""
from __future__ import annotations

import math

import torch

from immunize.errors import UserError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "linear")


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


def warmup_steps_of(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length as Hugging Face's Trainer counts it: ceil(total_steps * warmup_ratio)."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based), as transformers.get_scheduler
    computes it: during warmup step / warmup_steps (so the first step runs at lr 0), then 1 ("constant", HF's
    constant_with_warmup), half a cosine from 1 to 0 ("cosine") or a straight line to 0 at total_steps ("linear")."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; choose from {list(SCHEDULES)}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise UserError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = warmup_steps_of(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule))
