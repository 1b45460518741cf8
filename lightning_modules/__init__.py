"""LightningModules: one per method, on the shared CausalLMModule base and its two defense bases
(OneLossDefense: one loss per step; MultiPassDefense: several gradient passes per step)."""
from lightning_modules.adversarial_immunization import AdversarialImmunization
from lightning_modules.booster import Booster
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.lora import LoraSpec
from lightning_modules.multi_pass import MultiPassDefense
from lightning_modules.one_loss import OneLossDefense
from lightning_modules.repnoise import RepNoise
from lightning_modules.seam import SEAM
from lightning_modules.sft import SFT
from lightning_modules.t_vaccine import TVaccine
from lightning_modules.tar import TAR
from lightning_modules.vaccine import Vaccine

__all__ = ["AdversarialImmunization", "Booster", "CausalLMModule", "LoraSpec", "MultiPassDefense", "OneLossDefense",
           "RepNoise", "SEAM", "SFT", "TAR", "TVaccine", "Vaccine"]
