"""Conformance of immunize.lightning_modules.Vaccine with its authors' code.

Reference: github.com/git-disl/Vaccine (snapshot at commit 8937f68), files read:
- trainer.py: get_leaf_modules_with_grad (the perturbed modules: every LlamaAttention / OPTAttention), class
  VaccineTrainer: training_step, pre_first_step (a backward hook keeps grad_output[0], the gradient w.r.t. the
  attention output), after_first_step (eps = rho * g / (|g| + 1e-7), |g| one L2 norm of the per-module norms),
  pre_second_step (a forward hook adds eps to output[0]), after_second_step, _grad_norm;
- train.py (response-only labels: the prompt is IGNORE_INDEX) and script/alignment/Vaccine.sh (rho from the command
  line; the paper's main setting is 2, immunize's default).

The reference step, recomputed below in plain tensor code (the model's forward, tensor hooks and a token-mean
next-token cross-entropy from helpers.reference; no immunize hook or perturbation helper):
    pass 1: g_l = d CE / d (output of attention module l), for every layer l
            eps_l = rho * g_l / (sqrt(sum_l |g_l|^2) + 1e-7)
    pass 2: gradient = d CE / d w with eps_l added to attention output l
With SGD (momentum 0, no weight decay, constant lr, no warmup) the update of a one-step fit is -lr * gradient; it is
compared to 1e-5 global relative norm, in float64 ("64-true"; the reference runs bf16 autocast). The alignment batch
is the refusal part of the project's triplet batch (harmful prompts with refusals, as the reference's
BeaverTails_safe data).

Deliberate deviation: immunize's default site is "layer" (decoder-layer outputs, the paper's description); the
reference code perturbs the self-attention outputs. The test sets site="attention", which restores the reference.
"""
from __future__ import annotations


import pytest
import torch

from helpers.alignment import first_batch, float64_step
from helpers.reference import assert_update_is_sgd_step, ce, first, gnorm, rel
from immunize.lightning_modules import Vaccine

TOL = 1e-5
LR = 1e-2


def reference_gradient(model, part, rho):
    """(the weight gradient at the perturbed attention outputs, eps per layer, the clean weight gradient)."""
    params = list(model.parameters())
    sites = [layer.self_attn for layer in model.model.layers]
    seen = {}

    def keep_grad(i):
        def hook(module, args, output):
            first(output).register_hook(lambda g: seen.__setitem__(i, g.detach().clone()))
        return hook

    handles = [m.register_forward_hook(keep_grad(i)) for i, m in enumerate(sites)]
    clean = torch.autograd.grad(ce(model, part), params)  # a full backward, as the reference's first pass
    for h in handles:
        h.remove()
    grads = [seen[i] for i in range(len(sites))]
    norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
    eps = [g * (rho / (norm + 1e-7)) for g in grads]

    def add_eps(i):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                return output + eps[i]
            return (output[0] + eps[i], *output[1:])
        return hook

    handles = [m.register_forward_hook(add_eps(i)) for i, m in enumerate(sites)]
    perturbed = torch.autograd.grad(ce(model, part), params)
    for h in handles:
        h.remove()
    return perturbed, eps, clean


def test_update_matches_reference():
    """rho 2 at the attention outputs (site="attention", the reference's sites)."""
    module = Vaccine(model="toy:tiny", site="attention", optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0,
                     scheduler="constant", warmup_ratio=0.0)
    assert module.rho == 2.0
    batch = first_batch(module)
    start, update = float64_step(module, batch)

    grad, eps, clean = reference_gradient(start, batch["refusal"], module.rho)
    assert len(eps) == len(start.model.layers) and float(gnorm(eps)) == pytest.approx(module.rho, rel=1e-6)
    assert_update_is_sgd_step(update, grad, LR, TOL)
    # the perturbation moves the gradient far beyond the tolerance, so an unperturbed update could not pass
    assert rel(clean, grad) > 100 * TOL
