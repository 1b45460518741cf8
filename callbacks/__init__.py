"""Callbacks that hook a user's fine-tune (fine-tuning-stage and post-fine-tuning defenses) or measure a fit.

One file per callback (antidote, lisa, panacea, random_perturbation, safe_lora, loss_curve) on their shared base (base.py:
FineTuningDefense, the one extension point for fine-tuning-stage defenses). Installed as immunize.callbacks.

May import: Lightning, torch, everything of immunize below it (errors, io, outputs, datamodules, judges, metrics,
lightning_modules); a callback never imports a sibling callback, only immunize.callbacks.base.
"""
from immunize.callbacks.antidote import Antidote
from immunize.callbacks.lisa import Lisa
from immunize.callbacks.loss_curve import BenignLossCurve
from immunize.callbacks.panacea import Panacea
from immunize.callbacks.random_perturbation import RandomPerturbation
from immunize.callbacks.safe_lora import SafeLoRA

__all__ = ["Antidote", "BenignLossCurve", "Lisa", "Panacea", "RandomPerturbation", "SafeLoRA"]
