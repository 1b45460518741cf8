"""Booster: the applied gradient by hand and the bit-exact restore."""
from __future__ import annotations

import copy

import torch

from immunize.lightning_modules import Booster
from immunize.lightning_modules.booster import booster_gradient
from immunize.lightning_modules.functional.grad_math import global_norm, grads_of
from helpers.alignment import Capture, ce, first_batch, fit, params_of, rel_err


# ----- Booster -----------------------------------------------------------------------------------------
def booster_by_hand(model, batch, lam, alpha):
    harmful, refusal = batch["harmful"], batch["refusal"]
    params = [p for p in model.parameters() if p.requires_grad]
    g_h = grads_of(ce(model, harmful), params)
    moved = copy.deepcopy(model)
    norm = global_norm(g_h)
    with torch.no_grad():
        for p, g in zip([p for p in moved.parameters() if p.requires_grad], g_h):
            p.sub_(alpha * g / norm)
    g_moved = grads_of(ce(moved, harmful), [p for p in moved.parameters() if p.requires_grad])
    g_align = grads_of(ce(model, refusal), params)
    return [a + lam * (h - m) for a, h, m in zip(g_align, g_h, g_moved)], g_align


def test_booster_applied_gradient_is_align_plus_lam_harmful_difference():
    module = Booster(model="toy:tiny", lam=5.0, alpha=0.1, optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    expected, g_align = booster_by_hand(reference, capture.batches[0], 5.0, 0.1)
    assert rel_err(capture.grads[0], expected) < 1e-5
    assert rel_err(g_align, expected) > 1e-2  # the correction term matters


def test_booster_gradient_restores_the_weights_bit_exactly():
    module = Booster(model="toy:tiny")
    batch = first_batch(module)
    params = module.trainable_parameters()
    before = params_of(module)
    grads, stats = booster_gradient(lambda: ce(module.model, batch["harmful"]), lambda: ce(module.model, batch["refusal"]),
                                    params, alpha=0.1, lam=5.0)
    assert all(torch.equal(a, b) for a, b in zip(params_of(module), before))
    assert stats["h_perturbed"] < stats["h"]  # the simulated harmful step lowers the harmful loss
    assert all(torch.isfinite(g).all() for g in grads)
    plain, none = booster_gradient(lambda: 1 / 0, lambda: ce(module.model, batch["refusal"]), params, alpha=0.1, lam=0.0)
    assert none == {} and rel_err(plain, grads_of(ce(module.model, batch["refusal"]), params)) == 0.0


