"""Conformance of immunize.lightning_modules.SEAM with its authors' code.

Reference: github.com/ZJUWYH/seam (snapshot at commit 65f3d5c), files read:
- src/core/trainer.py, class SeamTrainer: training_step (the six passes and how the gradient is summed),
  compute_loss (splits "harmful" = L_ul, "harmless" = L_up, "attack" = g_a, "benign" = g_b),
  temporary_parameter_update (the two perturbed points), compute_cosine_similarity, compute_l2_norm;
- src/data_processing/_datasets.py: the benign (Alpaca) labels are the whole sequence with pads set to -100;
- config/train.yaml: alpha 1, beta 0.01, epsilon 1e-3 (immunize's defaults).

The reference step, recomputed below in plain tensor code (the model's forward, a token-mean next-token
cross-entropy from helpers.reference and a logit lens written here; no immunize estimator or loss helper):
    L_ul = -log(1 + S),  S = logit-lens mean of the harmful CE over the hidden states
    g_ul = grad L_ul,  g_up = grad CE(refusal),  g_a = grad CE(harmful),  g_b = grad CE(benign)
    c = <g_a, g_b> / (|g_a| |g_b| + 1e-8)
    g_a' = grad CE(harmful) at w + eps (g_b/|g_b| - c g_a/|g_a|)
    g_b' = grad CE(benign)  at w + eps (g_a/|g_a| - c g_b/|g_b|)
    gradient = g_ul + alpha g_up + (beta / eps) [(g_a' - g_a)/|g_a| + (g_b' - g_b)/|g_b|]
With SGD (momentum 0, no weight decay, constant lr, no warmup) the update of a one-step fit is -lr * gradient; it is
compared to 1e-5 global relative norm. The fit runs in float64 ("64-true") so that the finite difference
(1/eps = 1000 times the gradients' rounding) is compared without float32 noise; the algorithm is unchanged.

The batch: the project's triplet batch (response-only labels for harmful and refusal: the reference's mask of
positions where the paired harmful and refusal token ids differ selects the response), with the benign labels
replaced by the whole sequence (pads -100), as the reference's Alpaca loader builds them; the module uses whatever
labels the batch carries.

Deliberate deviation (lens_mean="reference" restores it): by default S is an honest mean of L + 1 terms (the embedding output and layer
outputs 1..L-1 through the final norm and lm_head, plus the real logits). The reference sums the real-logit CE
and the lens CE of ALL L + 1 hidden states (the last one, already normalised by the model, normalised again) and
divides these L + 2 terms by L + 1. test_update_matches_reference_literal_l_ul checks that term under the option.
"""
from __future__ import annotations


import pytest
import torch

from helpers.alignment import first_batch, float64_step
from helpers.reference import assert_update_is_sgd_step, ce, forward, gnorm, rel, token_ce
from immunize.lightning_modules import SEAM

TOL = 1e-5
LR = 1e-2


def unlearning_loss(model, harmful, literal: bool) -> torch.Tensor:
    """-log(1 + S); S honest (immunize) or as the reference code forms it (literal)."""
    out = forward(model, harmful, output_hidden_states=True)
    hidden, head, norm = out.hidden_states, model.lm_head, model.model.norm
    assert torch.allclose(head(hidden[-1]), out.logits)  # the last hidden state is already normalised
    final = token_ce(out.logits, harmful["labels"])
    if literal:  # every hidden state through norm (the last twice); L + 2 terms over L + 1
        s = (final + sum(token_ce(head(norm(h)), harmful["labels"]) for h in hidden)) / len(hidden)
    else:  # L + 1 terms: embedding and layers 1..L-1 through the lens, and the real logits
        terms = [token_ce(head(norm(h)), harmful["labels"]) for h in hidden[:-1]] + [final]
        s = sum(terms) / len(terms)
    return -torch.log(1 + s)


def grad_at(model, params, part, shift):
    """Gradient of CE(part) at w + shift; the weights are put back from a copy."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, shift):
            p.add_(d)
    g = torch.autograd.grad(ce(model, part), params)
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return g


def reference_gradient(model, batch, alpha, beta, eps, literal=False):
    """(the reference's step gradient, the part of it that L_sd contributes)."""
    harmful, refusal, benign = batch["harmful"], batch["refusal"], batch["benign"]
    params = list(model.parameters())
    g_ul = torch.autograd.grad(unlearning_loss(model, harmful, literal), params)
    g_up = torch.autograd.grad(ce(model, refusal), params)
    g_a = torch.autograd.grad(ce(model, harmful), params)
    g_b = torch.autograd.grad(ce(model, benign), params)
    na, nb = gnorm(g_a), gnorm(g_b)
    c = sum((a * b).sum() for a, b in zip(g_a, g_b)) / (na * nb + 1e-8)
    g_a_moved = grad_at(model, params, harmful, [eps * (b / nb - c * a / na) for a, b in zip(g_a, g_b)])
    g_b_moved = grad_at(model, params, benign, [eps * (a / na - c * b / nb) for a, b in zip(g_a, g_b)])
    sd = [(beta / eps) * ((am - a) / na + (bm - b) / nb) for a, am, b, bm in zip(g_a, g_a_moved, g_b, g_b_moved)]
    return [u + alpha * r + s for u, r, s in zip(g_ul, g_up, sd)], sd


def one_step(**kwargs):
    """One SGD step of SEAM with its default alpha, beta, eps: (module, fp64 model at the start, batch, update)."""
    module = SEAM(model="toy:tiny", optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0, scheduler="constant",
                  warmup_ratio=0.0, **kwargs)
    assert (module.alpha, module.beta, module.eps, module.estimator) == (1.0, 0.01, 1e-3, "finite_difference")
    batch = first_batch(module)
    benign = batch["benign"]
    benign["labels"] = benign["input_ids"].masked_fill(benign["attention_mask"] == 0, -100)  # the whole sequence
    start, update = float64_step(module, batch)
    return module, start, batch, update


@pytest.fixture(scope="module")
def seam_step():
    return one_step()


def test_update_matches_reference(seam_step):
    """Default settings, with immunize's honest logit-lens mean in L_ul."""
    module, start, batch, update = seam_step
    grad, sd = reference_gradient(start, batch, module.alpha, module.beta, module.eps)
    assert_update_is_sgd_step(update, grad, LR, TOL)
    # the L_sd estimate is far above the tolerance, so a wrong estimate could not pass
    assert float(gnorm(sd) / gnorm(grad)) > 100 * TOL


def test_update_matches_reference_literal_l_ul():
    """The reference's literal L_ul (off-by-one mean), restored by lens_mean="reference"."""
    module, start, batch, update = one_step(lens_mean="reference")
    grad, _ = reference_gradient(start, batch, module.alpha, module.beta, module.eps, literal=True)
    assert rel(update, [-LR * g for g in grad]) <= TOL
