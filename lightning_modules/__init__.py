"""LightningModules: one per method, on the shared CausalLMModule base and its two defense bases
(OneLossDefense: one loss per step; MultiPassDefense: several gradient passes per step).

Here, where a reader looks first: the bases (causal_lm, one_loss, multi_pass) and one file per method (sft, seam,
booster, vaccine, t_vaccine, repnoise, tar, adversarial_immunization, circuit_breakers, and the refusal_ablation
attack). Their machinery sits in three sub-packages: modeling/ (loading, LoRA, sharding, hooks, optimizer), functional/
(the math as plain functions, on top of modeling) and evaluation/ (generation, lm-eval, diagnostics). Installed as immunize.lightning_modules.

May import: torch, Lightning, transformers, peft, immunize.errors/io/outputs/fingerprint (L0-L1), immunize.datamodules
(L1), immunize.judges, immunize.metrics, immunize.statistics (L2); never immunize.callbacks, the CLI or the bench.
"""
from immunize.lightning_modules.adversarial_immunization import AdversarialImmunization
from immunize.lightning_modules.booster import Booster
from immunize.lightning_modules.causal_lm import CausalLMModule
from immunize.lightning_modules.circuit_breakers import CircuitBreakers
from immunize.lightning_modules.multi_pass import MultiPassDefense
from immunize.lightning_modules.one_loss import OneLossDefense
from immunize.lightning_modules.refusal_ablation import RefusalAblation
from immunize.lightning_modules.repnoise import RepNoise
from immunize.lightning_modules.seam import SEAM
from immunize.lightning_modules.sft import SFT
from immunize.lightning_modules.t_vaccine import TVaccine
from immunize.lightning_modules.tar import TAR
from immunize.lightning_modules.vaccine import Vaccine

__all__ = ["AdversarialImmunization", "Booster", "CausalLMModule", "CircuitBreakers", "MultiPassDefense",
           "OneLossDefense", "RefusalAblation", "RepNoise", "SEAM", "SFT", "TAR", "TVaccine", "Vaccine"]
