"""Adversarial-loss immunization: the loss against a hand computation."""
from __future__ import annotations


import pytest
import torch

from immunize.lightning_modules import AdversarialImmunization
from helpers.alignment import ce, first_batch


# ----- adversarial loss --------------------------------------------------------------------------------
def test_adversarial_loss_is_refusal_ce_minus_alpha_harmful_ce():
    module = AdversarialImmunization(model="toy:tiny", alpha=0.3)
    batch = first_batch(module)
    with torch.no_grad():
        loss, _, _ = module.adversarial_loss(batch)
        expected = ce(module.model, batch["refusal"]) - 0.3 * ce(module.model, batch["harmful"])
        assert float(ce(module.model, batch["harmful"])) > 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


