"""LightningModules: one per method, on the shared CausalLMModule base."""
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.lora import LoraSpec
from lightning_modules.seam import SEAM
from lightning_modules.sft import SFT

__all__ = ["CausalLMModule", "LoraSpec", "SEAM", "SFT"]
