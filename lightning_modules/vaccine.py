"""Vaccine (perturbation-aware alignment): align under the worst-case shift of the hidden states.

Per step, on the alignment batch (the refusals of a triplet batch, or a plain SFT batch):
  pass 1: forward, and the gradient g_l of the alignment loss w.r.t. each decoder layer's output hidden
          state (only those gradients: no weight gradients are formed);
          eps_l = rho * g_l / (|g| + 1e-7), |g| ONE norm over all layers and all samples;
  pass 2: forward with eps_l added to layer l's output (forward hooks), backward: that gradient updates the
          weights (automatic optimization: Lightning's clipping, accumulation and DDP apply).
site "layer" perturbs decoder-layer outputs (the paper's description); site "attention" perturbs each
layer's self-attention output, as the authors' released code does.

DDP: hidden states are per sample, so each rank perturbs its own samples with its own g; only the norm is
global. With the token-weighted loss (seam_math.rank_weights) the single-process loss on the global batch
is the mean over ranks of the weighted rank losses, whose gradient w.r.t. rank r's hidden states is
g_r / world; so |g| = sqrt(sum over ranks |g_r|^2) / world and eps_r = rho * g_r / sqrt(sum_r |g_r|^2):
one all-reduce (sum) of a scalar makes every rank's eps the slice of the single-process eps that belongs
to its samples. Averaging the norm, or normalising per rank, would not.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist

from immunize.errors import UserError
from immunize.lightning_modules.functional.grad_math import all_reduce_mean_, global_norm
from immunize.lightning_modules.modeling.hidden_hooks import add_to_outputs, capture_outputs, layer_submodules
from immunize.lightning_modules.functional.perturbation import normalized
from immunize.lightning_modules.one_loss import OneLossDefense
from immunize.lightning_modules.functional.supervised_ce import response_ce

SITES = {"layer": None, "attention": "self_attn"}


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_sq_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over ranks of the local squared norm of all tensors together (fp32 or wider)."""
    sq = global_norm(grads).pow(2).reshape(1)
    return all_reduce_mean_([sq])[0].mul(_world_size()).reshape(())


def perturbation(grads: Sequence[torch.Tensor], rho: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(rho * g_l / (|g| + 1e-7) for every l, |g|): one norm over all tensors and, under DDP, all ranks."""
    norm = global_sq_norm(grads).sqrt()
    return normalized(grads, rho, norm), norm


def alignment_part(batch) -> dict:
    """The refusals of a triplet batch, or a plain batch (AlignmentData mode sft) as it is."""
    if isinstance(batch, dict) and "refusal" in batch:
        return batch["refusal"]
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch
    raise UserError("Vaccine needs alignment batches: immunize.datamodules.AlignmentData (mode triplets: it trains on the "
                    "refusals; mode sft: on the whole stream)")


class Vaccine(OneLossDefense):
    """Vaccine alignment (Huang et al., "Vaccine: Perturbation-aware Alignment for Large Language Models against
    Harmful Fine-tuning Attack", NeurIPS 2024, Section 4, Algorithm 1).

    Args:
        rho: perturbation radius (2 in the paper's main setting; 2 to 20 in the literature).
        site: "layer" (decoder-layer outputs, the paper) or "attention" (self-attention outputs, the released code).
        **kwargs: CausalLMModule's arguments.
    """

    def __init__(self, rho: float = 2.0, site: str = "layer", **kwargs):
        super().__init__(**kwargs)
        if not (rho >= 0 and math.isfinite(rho)):
            raise UserError(f"{type(self).__name__} rho must be a finite number >= 0, got {rho}")
        if site not in SITES:
            raise UserError(f"unknown {type(self).__name__} site {site!r}; choose from {list(SITES)}")
        self.rho, self.site = float(rho), site

    def all_sites(self) -> list[torch.nn.Module]:
        """Every module whose output can be perturbed, in layer order."""
        return layer_submodules(self.model, SITES[self.site])

    def sites(self) -> list[torch.nn.Module]:
        """The modules perturbed this step (Vaccine: all of them)."""
        return self.all_sites()

    def _loss(self, part: dict) -> torch.Tensor:
        return response_ce(self.model, part)

    def hidden_gradients(self, part: dict, modules, weight: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(d (weight * CE) / d output of each module, the CE): one forward and one backward to the hidden states
        only (no weight gradient is formed)."""
        with capture_outputs(modules) as hidden:
            loss = self._loss(part)
        if any(h is None for h in hidden):
            raise UserError(f"{type(self).__name__}: a perturbation site did not run in the forward pass")
        live = [i for i, h in enumerate(hidden) if h.requires_grad]  # all of them unless early layers are frozen
        found = dict(zip(live, torch.autograd.grad(loss * weight, [hidden[i] for i in live], allow_unused=True)
                         if live else []))
        grads = [torch.zeros_like(h) if found.get(i) is None else found[i] for i, h in enumerate(hidden)]
        return grads, loss

    def hidden_perturbation(self, part: dict, weight: float = 1.0):
        """Pass 1: (eps per site, the clean loss, |g|). weight scales the loss (DDP token weight)."""
        grads, loss = self.hidden_gradients(part, self.sites(), weight)
        eps, norm = perturbation(grads, self.rho)
        return eps, loss.detach(), norm.detach()

    def defense_loss(self, batch):
        part = alignment_part(batch)
        (weight,) = self.token_weights(part)
        if self.rho > 0:
            eps, clean, norm = self.hidden_perturbation(part, weight)
            with add_to_outputs(self.sites(), eps):
                loss = self._loss(part)
            del eps
        else:  # no perturbation: plain SFT, one pass
            loss = self._loss(part)
            clean, norm = loss.detach(), torch.zeros(())
        return loss * weight, {"clean_loss": clean, "hidden_grad_norm": norm, "loss": loss.detach()}
