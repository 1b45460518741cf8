"""Supervised fine-tuning: the alignment stage without a defense, a user's fine-tune, and the attack."""
from __future__ import annotations

from immunize.lightning_modules.one_loss import OneLossDefense


class SFT(OneLossDefense):
    """Minimise the response-only cross-entropy of each batch, token-weighted under DDP (so the rank-averaged
    gradient is that of the global batch's token mean); the constructor arguments are CausalLMModule's."""

    loss_name = "training loss"

    def defense_loss(self, batch):
        (weight,) = self.token_weights(batch)
        loss = self.lm_loss(batch)
        return loss * weight, {"loss": loss.detach()}
