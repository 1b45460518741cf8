"""Adversarial-loss immunization (the demo defense of the immunization paper): learn refusals, unlearn harmful answers.

L = CE_m(refusal) - alpha * CE_m(harmful) on paired (prompt, refusal) / (prompt, harmful answer) samples,
m = response tokens. The ascent term is unbounded; the paper reports it resists weak attacks only.
"""
from __future__ import annotations

import math

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.one_loss import OneLossDefense
from immunize.lightning_modules.functional.supervised_ce import response_ce


class AdversarialImmunization(OneLossDefense):
    """Automatic optimization; one backward through both CE terms per step (2 forwards, 2 backwards' worth).

    DDP: each CE is token-weighted by seam_math.rank_weights, so the rank-averaged gradient is the one of
    the global batch's token means (the same as one process on the whole batch).
    Rosati et al., "Immunization against harmful fine-tuning attacks" (EMNLP Findings 2024), Section 5.

    Args:
        alpha: weight of the harmful-answer CE that is ascended (the paper's 0.1).
        **kwargs: CausalLMModule's arguments.
    """

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if not (alpha >= 0 and math.isfinite(alpha)):
            raise UserError(f"AdversarialImmunization alpha must be a finite number >= 0, got {alpha}")
        self.alpha = float(alpha)

    def _ce(self, part: dict) -> torch.Tensor:
        return response_ce(self.model, part)

    def adversarial_loss(self, batch: dict, weights: tuple[float, float] = (1.0, 1.0)):
        """(loss, CE on refusals, CE on harmful answers); weights scale the two CEs (DDP token weights)."""
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "AdversarialImmunization")
        ce_refusal = self._ce(refusal)
        ce_harmful = self._ce(harmful) if self.alpha > 0 else ce_refusal.new_zeros(())
        loss = weights[1] * ce_refusal - self.alpha * weights[0] * ce_harmful
        return loss, ce_refusal.detach(), ce_harmful.detach()

    def defense_loss(self, batch):
        harmful, refusal = require_parts(batch, ("harmful", "refusal"), "AdversarialImmunization")
        loss, ce_refusal, ce_harmful = self.adversarial_loss(batch, tuple(self.token_weights(harmful, refusal)))
        return loss, {"ce_refusal": ce_refusal, "ce_harmful": ce_harmful, "loss": ce_refusal - self.alpha * ce_harmful}
