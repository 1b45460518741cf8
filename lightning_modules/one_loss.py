"""The extension point for defenses that are one loss per step (automatic optimization).

A subclass implements one hook:

    def defense_loss(self, batch) -> tuple[torch.Tensor, dict]:
        '''(this rank's loss, values to log): the loss's gradient, averaged over DDP ranks by Lightning, is the
        method's gradient on the global batch.'''

and gets, from this base: the finite check (a NaN stops the fit with one line), logging of every returned term
under train/<name> (and train/loss), Lightning's own gradient clipping, accumulation and DDP, and the
gradient-norm log of CausalLMModule. `token_weights(*parts)` gives the DDP token weights that make a rank's
per-token mean count as its share of the global batch's token mean (use them on each CE term).
SFT, adversarial-loss immunization, RepNoise, Vaccine and Circuit Breakers are such defenses.
"""
from __future__ import annotations

import torch

from immunize.lightning_modules.functional.batch_parts import batch_size
from immunize.lightning_modules.causal_lm import CausalLMModule
from immunize.lightning_modules.functional.global_batch import rank_weights


class OneLossDefense(CausalLMModule):
    """Base for one-loss methods (see the module docstring); the constructor arguments are CausalLMModule's."""

    loss_name = None  # how a non-finite loss is named in the error (default "<Class> loss")

    def defense_loss(self, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__} must implement defense_loss(batch) -> (loss, logs)")

    @staticmethod
    def token_weights(*parts: dict) -> list[float]:
        """Per-part DDP token weights (1.0 each in a single process): see seam_math.rank_weights."""
        return rank_weights([part["labels"] for part in parts])

    def training_step(self, batch, batch_idx):
        loss, logs = self.defense_loss(batch)
        self.check_finite(loss, self.loss_name or f"{type(self).__name__} loss")
        size = batch_size(batch)
        shown = logs.pop("loss", loss.detach())
        if logs:
            self.log_dict({f"train/{k}": torch.as_tensor(v, dtype=torch.float32) for k, v in logs.items()},
                          batch_size=size)
        self.log("train/loss", torch.as_tensor(shown, dtype=torch.float32), prog_bar=True, batch_size=size)
        return loss

