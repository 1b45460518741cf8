"""Supervised fine-tuning: the alignment stage without a defense, a user's fine-tune, and the attack."""
from __future__ import annotations

from lightning_modules.causal_lm import CausalLMModule


class SFT(CausalLMModule):
    """Minimise the response-only cross-entropy of each batch."""

    def training_step(self, batch, batch_idx):
        loss = self.check_finite(self.lm_loss(batch), "training loss")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss
