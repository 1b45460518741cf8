"""Callbacks that hook a user's fine-tune: fine-tuning-stage and post-fine-tuning defenses."""
from callbacks.antidote import Antidote
from callbacks.lisa import Lisa
from callbacks.panacea import Panacea
from callbacks.random_perturbation import RandomPerturbation

__all__ = ["Antidote", "Lisa", "Panacea", "RandomPerturbation"]
