"""Vaccine: the hidden-state perturbation and the update against hand computations."""
from __future__ import annotations

import copy

import pytest
import torch

from immunize.lightning_modules import Vaccine
from immunize.lightning_modules.functional.grad_math import global_norm, grads_of
from helpers.alignment import Capture, ce, first_batch, fit, rel_err


# ----- Vaccine -----------------------------------------------------------------------------------------
def _site_modules(model, site):
    layers = list(model.model.layers)
    return layers if site == "layer" else [layer.self_attn for layer in layers]


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def vaccine_by_hand(model, part, rho, site):
    """(eps per site, gradient of the perturbed loss): hooks written here, independent of hidden_hooks."""
    model = copy.deepcopy(model)
    sites = _site_modules(model, site)
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: outs.__setitem__(i, _first(out))) for i, m in enumerate(sites)]
    grads = torch.autograd.grad(ce(model, part), [outs[i] for i in range(len(sites))])
    for hook in hooks:
        hook.remove()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    eps = [(g.double() * rho / norm).float() for g in grads]

    def add(i):
        def hook(mod, a, out):
            return out + eps[i] if isinstance(out, torch.Tensor) else (out[0] + eps[i], *out[1:])
        return hook

    hooks = [m.register_forward_hook(add(i)) for i, m in enumerate(sites)]
    params = [p for p in model.parameters() if p.requires_grad]
    grad = grads_of(ce(model, part), params)
    for hook in hooks:
        hook.remove()
    return eps, grad


@pytest.mark.parametrize("site", ["layer", "attention"])
def test_vaccine_perturbation_is_rho_g_over_norm(site):
    module = Vaccine(model="toy:tiny", rho=2.0, site=site)
    part = first_batch(module)["refusal"]
    eps, _, norm = module.hidden_perturbation(part)
    expected, _ = vaccine_by_hand(module.model, part, 2.0, site)
    assert len(eps) == len(expected) == 2 and float(norm) > 0
    for e, x in zip(eps, expected):
        assert e.shape == x.shape
        assert float((e - x).abs().max()) <= 1e-5 * float(x.abs().max())
    assert float(global_norm(eps)) == pytest.approx(2.0, rel=1e-5)


def test_vaccine_update_is_the_gradient_at_the_perturbed_hidden_states():
    module = Vaccine(model="toy:tiny", rho=2.0, optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    part = capture.batches[0]["refusal"]
    _, expected = vaccine_by_hand(reference, part, 2.0, "layer")
    clean = grads_of(ce(reference, part), [p for p in reference.parameters() if p.requires_grad])
    assert rel_err(capture.grads[0], expected) < 1e-5
    assert rel_err(clean, expected) > 1e-3  # the perturbation changes the gradient measurably


