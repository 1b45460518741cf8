"""Callbacks that hook a user's fine-tune (fine-tuning-stage and post-fine-tuning defenses) or measure a fit."""
from callbacks.antidote import Antidote
from callbacks.lisa import Lisa
from callbacks.loss_curve import BenignLossCurve
from callbacks.panacea import Panacea
from callbacks.random_perturbation import RandomPerturbation

__all__ = ["Antidote", "BenignLossCurve", "Lisa", "Panacea", "RandomPerturbation"]
