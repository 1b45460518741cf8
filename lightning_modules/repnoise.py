"""RepNoise (Representation Noising): push harmful representations toward Gaussian noise while learning refusals.

L = CE_m(refusal) + beta * L_noise - alpha * log(1 + H), on paired harmful/refusal batches (m: response tokens):
- H: harmful CE at the final logits plus the logit-lens CEs of every hidden state (logit_lens.logit_lens_ce,
  the same function as SEAM's L_ul; -log(1 + H) is logit_lens.bounded_ascent).
- L_noise: mean over decoder layers of MMD^2 (mmd.noise_mmd: Gaussian kernels, 5 bandwidths around the mean
  pairwise distance) between the layer's MLP outputs on the harmful batch, masked to the response tokens,
  and standard Gaussian noise of the same shape and mask.
One harmful forward (hidden states + MLP-output hooks) serves H and L_noise; one refusal forward gives the CE.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.functional.grad_math import IGNORE
from immunize.lightning_modules.modeling.hidden_hooks import capture_outputs, layer_submodules, lens_modules
from immunize.lightning_modules.functional.logit_lens import LENS_MEANS, bounded_ascent, logit_lens_ce
from immunize.lightning_modules.functional.mmd import noise_mmd
from immunize.lightning_modules.one_loss import OneLossDefense
from immunize.lightning_modules.functional.global_batch import global_value
from immunize.lightning_modules.functional.supervised_ce import response_ce, response_forward


class RepNoise(OneLossDefense):
    """Automatic optimization (Lightning's clipping and accumulation flags apply).

    DDP: the CEs are token-weighted (seam_math.rank_weights) and -log(1 + H) takes the rank-averaged H
    (seam_math.global_value), so those terms follow the global batch exactly. L_noise is a batch statistic
    (kernel bandwidth and MMD over the rank's own samples): under DDP it is the mean of per-rank MMDs, the
    estimator a per-device implementation computes (the reference's, with its per-GPU batches).
    Rosati et al., "Representation Noising: A Defence Mechanism Against Harmful Finetuning" (NeurIPS 2024), Section 3.

    Args:
        alpha: weight of the bounded ascent -log(1 + H) (the paper's 1).
        beta: weight of L_noise (the paper's 1e-3).
        kernel_mul, kernel_num: the MMD's Gaussian kernel bandwidths (kernel_num of them, a factor kernel_mul apart).
        lens_mean: "honest" (the mean of the L + 1 logit-lens terms of H) or "reference" (the authors' code: L + 2
            terms, the last hidden state normalised twice, divided by L + 1; functional.logit_lens).
        **kwargs: CausalLMModule's arguments.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1e-3, kernel_mul: float = 2.0, kernel_num: int = 5,
                 lens_mean: Literal["honest", "reference"] = "honest", **kwargs):
        super().__init__(**kwargs)
        if lens_mean not in LENS_MEANS:
            raise UserError(f"RepNoise lens_mean must be one of {', '.join(LENS_MEANS)}, got {lens_mean!r}")
        self.lens_mean = lens_mean
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"RepNoise {name} must be a finite number >= 0, got {value}")
        if int(kernel_num) != kernel_num or kernel_num < 1 or not kernel_mul > 0:
            raise UserError(f"RepNoise needs kernel_num an integer >= 1 and kernel_mul > 0, got {kernel_num}, {kernel_mul}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.kernel_mul, self.kernel_num = float(kernel_mul), int(kernel_num)

    def repnoise_terms(self, batch: dict, w_harmful: float = 1.0):
        """(CE on refusals, L_noise, H) as graph-attached scalars; H is multiplied by w_harmful (DDP weight)."""
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "RepNoise")
        ce_refusal = response_ce(self.model, refusal)
        zero = ce_refusal.new_zeros((), dtype=torch.float32)
        if self.alpha == 0 and self.beta == 0:
            return ce_refusal, zero, zero
        mlps = layer_submodules(self.model, "mlp") if self.beta > 0 else []
        with capture_outputs(mlps) as activations:
            final_ce, hidden_states = response_forward(self.model, harmful, hidden=self.alpha > 0)
        if self.beta > 0:
            mask = harmful["labels"] != IGNORE
            l_noise = torch.stack([noise_mmd(a, mask, self.kernel_mul, self.kernel_num) for a in activations]).mean()
        else:
            l_noise = zero
        if self.alpha > 0:
            lm_head, norm = lens_modules(self.model)
            h = logit_lens_ce(hidden_states, harmful["labels"], lm_head, norm, final_ce=final_ce,
                                 mean=self.lens_mean) * w_harmful
        else:
            h = zero
        return ce_refusal, l_noise, h

    def defense_loss(self, batch):
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "RepNoise")
        w_h, w_r = self.token_weights(harmful, refusal)
        ce_refusal, l_noise, h = self.repnoise_terms(batch, w_h)
        ascent = bounded_ascent(global_value(h)) if self.alpha > 0 else h
        logs = {"ce_refusal": ce_refusal.detach(), "L_noise": l_noise.detach(),
                "loss": (ce_refusal + self.beta * l_noise + self.alpha * ascent).detach()}
        if self.alpha > 0:
            logs["H"] = h.detach() / w_h if w_h > 0 else h.detach()
        return w_r * ce_refusal + self.beta * l_noise + self.alpha * ascent, logs
