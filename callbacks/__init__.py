"""Callbacks that hook a fit: fine-tuning-stage defenses applied at fit end."""
from callbacks.antidote import Antidote
from callbacks.lisa import Lisa
from callbacks.panacea import Panacea
from callbacks.random_perturbation import RandomPerturbation

__all__ = ["Antidote", "Lisa", "Panacea", "RandomPerturbation"]
