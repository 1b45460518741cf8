"""T-Vaccine (targeted Vaccine): Vaccine's hidden-state perturbation on safety-critical layers only.

Liu et al., "Targeted Vaccine: Safety Alignment for Large Language Models against Harmful Fine-Tuning via
Layer-wise Perturbation" (arXiv 2410.09760), Section 4, as its reference code computes it (Lslland/T-Vaccine,
trainer.py BaseTrainer):
- every `probability_every` optimizer steps, the harmful batch's CE is back-propagated to the output of every
  layer's self-attention module; layer l's sampling probability is |g_l| / sum_j |g_j| (norms over all ranks'
  samples);
- every `resample_every` steps, `active_layers` layers are drawn without replacement with those probabilities
  (one seeded generator, so every rank draws the same layers);
- the step is Vaccine's (pass 1: eps = rho * g / |g| on the refusals' gradients at the self-attention outputs of
  the active layers, one norm over them; pass 2: the loss with eps added to those outputs), and the self-attention
  weights of the inactive layers are frozen for that step; the MLPs (and, in full fine-tuning, embeddings, norms
  and head) train in every layer. Their gradients are dropped before the optimizer step, so neither they nor their
  optimizer state change.
site "layer" perturbs whole decoder-layer outputs and freeze "layer" freezes everything outside the active layers:
immunize's earlier variant, kept as options (docs/fidelity.md).
Deviation: the reference saves memory by not forming the frozen weights' gradients at all; here they are formed
and dropped, which keeps Lightning's DDP reducer (all parameters always trainable) and costs Vaccine's memory.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.modeling.hidden_hooks import decoder_layers, layer_submodules
from immunize.lightning_modules.vaccine import Vaccine, global_sq_norm


FREEZE = ("attention", "layer")


def layer_probabilities(grads: list[torch.Tensor]) -> torch.Tensor:
    """|g_l| / sum_j |g_j| over all DDP ranks' samples (fp32, on the CPU); uniform when every norm is 0."""
    norms = torch.stack([global_sq_norm([g]).sqrt().float().cpu() for g in grads])
    total = float(norms.sum())
    return norms / total if total > 0 and math.isfinite(total) else torch.full_like(norms, 1.0 / len(norms))


def sample_layers(probabilities: torch.Tensor, count: int, seed: int) -> list[int]:
    """`count` distinct layer indices drawn with the given probabilities (a pure function of its arguments)."""
    generator = torch.Generator().manual_seed(seed)
    positive = int((probabilities > 0).sum())
    count = min(count, len(probabilities))
    if positive < count:  # not enough layers with a gradient: fill with the others, uniformly
        probabilities = probabilities + 1e-12
    return sorted(torch.multinomial(probabilities, count, replacement=False, generator=generator).tolist())


class TVaccine(Vaccine):
    """T-Vaccine on triplet batches: layer probabilities from `harmful`, Vaccine's step on `refusal`.

    Args:
        rho: perturbation radius (the authors' scripts use 3).
        freeze: what is frozen outside the active layers: "attention" (the reference: their self-attention weights)
            or "layer" (every weight outside the active decoder layers, embeddings and head included).
        active_layers: layers perturbed and trained per step (the authors' 8 of 32 on Llama-2-7B).
        resample_every: steps between two draws of the active layers (the authors' 20).
        probability_every: steps between two measurements of the layer probabilities (the authors' 200).
        seed: the draws' seed.
        site: "attention" (the reference: self-attention outputs) or "layer" (decoder-layer outputs).
        **kwargs: CausalLMModule's arguments.
    """

    def __init__(self, rho: float = 3.0, active_layers: int = 8, resample_every: int = 20,
                 probability_every: int = 200, seed: int = 0, site: Literal["attention", "layer"] = "attention",
                 freeze: Literal["attention", "layer"] = "attention", **kwargs):
        super().__init__(rho=rho, site=site, **kwargs)
        if freeze not in FREEZE:
            raise UserError(f"TVaccine freeze must be one of {', '.join(FREEZE)}, got {freeze!r}")
        self.freeze = freeze
        for name, value in (("active_layers", active_layers), ("resample_every", resample_every),
                            ("probability_every", probability_every)):
            if int(value) != value or value < 1:
                raise UserError(f"TVaccine {name} must be an integer >= 1, got {value}")
        self.active_layers, self.resample_every = int(active_layers), int(resample_every)
        self.probability_every, self.seed = int(probability_every), int(seed)
        self.probabilities: Optional[torch.Tensor] = None
        self.active: list[int] = []

    def sites(self) -> list[torch.nn.Module]:
        """The perturbation sites of the active layers."""
        every = self.all_sites()
        return [every[i] for i in self.active]

    def update_layers(self, harmful: dict, weight: float) -> None:
        """Measure the layer probabilities and draw the active layers when their schedules say so."""
        step = self.global_step
        if self.probabilities is None or step % self.probability_every == 0:
            grads, _ = self.hidden_gradients(harmful, self.all_sites(), weight)
            self.probabilities = layer_probabilities(grads)
            del grads
        if not self.active or step % self.resample_every == 0:
            self.active = sample_layers(self.probabilities, self.active_layers, self.seed * 1_000_003 + step)

    def defense_loss(self, batch):
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "TVaccine")
        w_h, w_r = self.token_weights(harmful, refusal)
        self.update_layers(harmful, w_h)
        loss, logs = super().defense_loss(batch)
        logs["active_layers"] = float(len(self.active))
        return loss, logs

    def frozen_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable tensors frozen for this step: the inactive layers' self-attention weights (freeze
        "attention"), or every tensor outside the active decoder layers (freeze "layer")."""
        if self.freeze == "attention":
            inactive = {id(p) for i, attention in enumerate(layer_submodules(self.model, "self_attn"))
                        if i not in self.active for p in attention.parameters()}
            return [p for p in self.trainable_parameters() if id(p) in inactive]
        active = {id(p) for i, layer in enumerate(decoder_layers(self.model)) if i in self.active
                  for p in layer.parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in active]

    def on_before_optimizer_step(self, optimizer) -> None:
        for p in self.frozen_parameters():
            p.grad = None  # the optimizer skips a tensor without a gradient (no update, no state change)
        super().on_before_optimizer_step(optimizer)

    # ----- resume: the layer schedule is state ------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["t_vaccine"] = {"probabilities": self.probabilities, "active": list(self.active)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("t_vaccine") or {}
        self.probabilities, self.active = state.get("probabilities"), list(state.get("active") or [])
