"""Conformance of immunize.lightning_modules.Booster with its authors' code.

Reference: github.com/git-disl/Booster (snapshot at commit 6421918), files read:
- trainer.py, class BoosterAlignmentTrainer: training_step (its inner step(), branch perturb_aware == "False", the
  default), _grad_norm (one L2 norm of the per-tensor norms), get_harmful_dataloader / sample_from_harmful;
- train.py: the arguments (--lamb, --alpha, --perturb_aware) and how the trainer is built;
- script/alignment/smooth_align.sh: lamb 5, alpha 0.1 (immunize's defaults).

The reference step, recomputed below in plain tensor code (the model's forward and a token-mean next-token
cross-entropy from helpers.reference; no immunize gradient or perturbation helper):
    g_h  = grad h(w)                                  h: CE on the harmful batch
    w'   = w - alpha * g_h / (|g_h| + 1e-7)
    g_h' = grad h(w');  back to w
    gradient = grad CE_align(w) + lamb * g_h - lamb * g_h'
With SGD (momentum 0, no weight decay, constant lr, no warmup) the update of a one-step fit is -lr * gradient; it is
compared to 1e-5 global relative norm, in float64 ("64-true"; the reference runs bf16 autocast, the algorithm is the
same). The batch is the project's triplet batch: refusal = the alignment batch, harmful = the harmful batch (the
reference draws its harmful batch from a separate BeaverTails loader; which rows are drawn is data plumbing).
"""
from __future__ import annotations


import torch

from helpers.alignment import first_batch, float64_step
from helpers.reference import assert_update_is_sgd_step, ce, gnorm
from immunize.lightning_modules import Booster

TOL = 1e-5
LR = 1e-2


def reference_gradient(model, batch, lamb, alpha):
    """(the reference's step gradient, the harmful-perturbation term lamb * (g_h - g_h'))."""
    params = list(model.parameters())
    g_h = torch.autograd.grad(ce(model, batch["harmful"]), params)
    norm = torch.norm(torch.stack([g.norm(p=2) for g in g_h]), p=2) + 1e-7
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, g_h):
            p.sub_(alpha * g / norm)
    g_moved = torch.autograd.grad(ce(model, batch["harmful"]), params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    g_align = torch.autograd.grad(ce(model, batch["refusal"]), params)
    term = [lamb * g - lamb * m for g, m in zip(g_h, g_moved)]
    return [a + t for a, t in zip(g_align, term)], term


def test_update_matches_reference():
    """Default lam 5, alpha 0.1: the one-step SGD update is -lr times the reference's gradient."""
    module = Booster(model="toy:tiny", optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0, scheduler="constant",
                     warmup_ratio=0.0)
    assert (module.lam, module.alpha, module.grad_clip) == (5.0, 0.1, None)
    batch = first_batch(module)
    start, update = float64_step(module, batch)

    grad, term = reference_gradient(start, batch, module.lam, module.alpha)
    assert_update_is_sgd_step(update, grad, LR, TOL)
    # the harmful-perturbation term is far above the tolerance, so getting it wrong could not pass
    assert float(gnorm(term) / gnorm(grad)) > 100 * TOL
