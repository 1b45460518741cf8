"""Flat-gradient helpers: norms and dot products over parameter lists, masked CE, the fp32 check."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from immunize.errors import UserError
from immunize.lightning_modules.functional.grad_math import accumulate_grads_, add_scaled_, all_reduce_mean_, dot, global_norm, grads_of, masked_ce
from immunize.lightning_modules.functional.hessian_free import finite_difference_sd_grad

from helpers.math import tiny_llama


def test_global_norm_and_dot_match_cat():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 4, generator=gen), torch.randn(7, generator=gen), torch.randn(2, 2, 2, generator=gen)]
    b = [torch.randn(t.shape, generator=gen) for t in a]
    flat_a, flat_b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    assert torch.allclose(dot(a, b), flat_a @ flat_b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(global_norm(a), flat_a.norm(), rtol=1e-6)
    half = [t.bfloat16() for t in a]
    assert global_norm(half).dtype == torch.float32
    assert all_reduce_mean_(a) is a  # not distributed: no-op


def test_accumulate_grads_adds_in_place_and_keeps_pending_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    params = list(lin.parameters())
    x = torch.randn(6, 5)
    expected = [g.clone() for g in grads_of(lin(x).pow(2).sum(), params)]
    pending = [torch.full_like(p, 7.0) for p in params]  # an accumulating p.grad (earlier micro-batches)
    for p, g in zip(params, pending):
        p.grad = g
    start = [torch.randn_like(p) for p in params]
    buffers = [t.clone() for t in start]
    storage = [b.data_ptr() for b in buffers]
    out = accumulate_grads_(lin(x).pow(2).sum(), params, buffers)
    assert buffers == []  # emptied: only p.grad held the buffers during the backward
    assert [t.data_ptr() for t in out] == storage  # added in place, no gradient-sized temporary kept
    for o, s0, e in zip(out, start, expected):
        assert torch.allclose(o, s0 + e, atol=1e-6)
    assert all(p.grad is g for p, g in zip(params, pending))
    with pytest.raises(ValueError, match="buffer"):
        accumulate_grads_(lin(x).sum(), params, [torch.zeros(3) for _ in params])


def test_masked_ce_matches_manual():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    labels = torch.randint(0, 11, (2, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, 4] = -100
    terms = [-F.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
             for b in range(2) for t in range(1, 6) if labels[b, t] != -100]
    assert torch.allclose(masked_ce(logits, labels), torch.stack(terms).mean(), rtol=1e-6)
    assert masked_ce(logits.bfloat16(), labels).dtype == torch.float32
    assert masked_ce(logits, torch.full_like(labels, -100)).item() == 0.0  # no NaN on an empty mask


def test_half_precision_params_are_refused():
    p32 = torch.nn.Parameter(torch.ones(3))
    add_scaled_([p32], [torch.full((3,), 2.0)], 0.5)
    assert torch.equal(p32.data, torch.full((3,), 2.0))
    p16 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(UserError, match="bf16-mixed"):
        add_scaled_([p16], [torch.ones(3)], 1e-3)
    model = tiny_llama(torch.bfloat16)
    params = list(model.parameters())
    g = [torch.ones_like(p, dtype=torch.float32) for p in params]
    with pytest.raises(UserError, match="fp32"):
        finite_difference_sd_grad(params, lambda: g, lambda: g, g, g, 1e-3)
    assert torch.equal(p16.data, torch.ones(3, dtype=torch.bfloat16))
