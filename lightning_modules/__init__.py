"""LightningModules: one per method, on the shared CausalLMModule base."""
from lightning_modules.adversarial_immunization import AdversarialImmunization
from lightning_modules.booster import Booster
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.lora import LoraSpec
from lightning_modules.repnoise import RepNoise
from lightning_modules.seam import SEAM
from lightning_modules.sft import SFT
from lightning_modules.vaccine import Vaccine

__all__ = ["AdversarialImmunization", "Booster", "CausalLMModule", "LoraSpec", "RepNoise", "SEAM", "SFT", "Vaccine"]
