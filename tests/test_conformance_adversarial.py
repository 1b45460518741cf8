"""Conformance of immunize.lightning_modules.AdversarialImmunization with its authors' code.

Reference: the immunization paper's code base `immunization_llms` (Rosati et al., "Immunization against harmful
fine-tuning attacks"), read from its public copy github.com/boyiwei/RepNoise-Reproduce (snapshot at commit
4f6572d; the authors' own repository was not available here), files read:
- immunization_llms/training.py, compute_loss, branch loss_fn_name == 'adversarial_loss';
- immunization_llms/loss.py, masked_token_ce_loss (at HEAD and at the first commit a35c98a);
- immunization_llms/arguments.py: --adversarial-alpha 0.1 (immunize's default).

The reference loss, recomputed below in plain tensor code (the model's forward and a token-mean next-token
cross-entropy over the response positions, from helpers.reference; no immunize loss helper):
    L = CE_m(refusal) - alpha * CE_m(harmful)
With SGD (momentum 0, no weight decay, constant lr, no warmup) the update of a one-step fit is -lr * grad L; it is
compared to 1e-5 global relative norm, in float64 ("64-true"). The batch is the project's triplet batch (paired
harmful/refusal parts with response-only labels). The reference's mask m is the positions where the paired harmful
and refusal token ids differ (the response); its masked_token_ce_loss also multiplies the logits of the position
that predicts the first response token by 0 (a constant log V term without gradient) and ignores token id 0;
immunize's response CE does neither (see the fidelity note), and this test uses the plain response CE.
"""
from __future__ import annotations


import torch

from helpers.alignment import first_batch, float64_step
from helpers.reference import assert_update_is_sgd_step, ce, gnorm
from immunize.lightning_modules import AdversarialImmunization

TOL = 1e-5
LR = 1e-2


def test_update_matches_reference():
    """Default alpha 0.1: the one-step SGD update is -lr * grad(CE(refusal) - alpha CE(harmful))."""
    module = AdversarialImmunization(model="toy:tiny", optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0,
                                     scheduler="constant", warmup_ratio=0.0)
    assert module.alpha == 0.1
    batch = first_batch(module)
    start, update = float64_step(module, batch)

    params = list(start.parameters())
    g_refusal = torch.autograd.grad(ce(start, batch["refusal"]), params)
    g_harmful = torch.autograd.grad(ce(start, batch["harmful"]), params)
    grad = [r - module.alpha * h for r, h in zip(g_refusal, g_harmful)]
    assert_update_is_sgd_step(update, grad, LR, TOL)
    # the ascent term is far above the tolerance, so dropping it or flipping its sign could not pass
    assert float(module.alpha * gnorm(g_harmful) / gnorm(grad)) > 100 * TOL
