"""SEAM's Hessian-free L_sd gradient against exact Hessian-vector products; exact restores."""

from __future__ import annotations

import math

import pytest
import torch

from immunize.lightning_modules.functional.grad_math import all_reduce_mean_, global_norm, grads_of, masked_ce
from immunize.lightning_modules.functional.hessian_free import cosine_directions, exact_sd_grad, finite_difference_sd_grad

from helpers.math import batch, cosine, loss_fns, rel_err, tiny_llama


def test_cosine_directions_match_flat_formula():
    gen = torch.Generator().manual_seed(1)
    g_a = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    g_b = [torch.randn(t.shape, generator=gen) + 0.5 * t for t in g_a]
    c, v_a, v_b, na, nb = cosine_directions(g_a, g_b)
    fa, fb = torch.cat([t.reshape(-1) for t in g_a]), torch.cat([t.reshape(-1) for t in g_b])
    ua, ub = fa / fa.norm(), fb / fb.norm()
    cf = ua @ ub
    assert torch.allclose(c, cf, rtol=1e-6) and torch.allclose(na, fa.norm()) and torch.allclose(nb, fb.norm())
    assert torch.allclose(torch.cat([t.reshape(-1) for t in v_a]), ub - cf * ua, atol=1e-6)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in v_b]), ua - cf * ub, atol=1e-6)
    assert math.isclose(float(global_norm(v_a)), math.sqrt(1 - float(cf) ** 2), rel_tol=1e-5)


def test_exact_sd_grad_matches_functional_hvp():
    """exact_sd_grad (grad of the cosine) == H_a v_a/|g_a| + H_b v_b/|g_b| from torch.autograd.functional.hvp."""
    model = tiny_llama(torch.float64)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    loss_a, loss_b = loss_fns(model)
    exact = exact_sd_grad(params, loss_a, loss_b)

    (xa, ya), (xb, yb) = batch(1), batch(2)

    def functional_loss(ids, labels):
        def f(*ps):
            logits = torch.func.functional_call(model, dict(zip(names, ps)), (ids,)).logits
            return masked_ce(logits, labels)
        return f

    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)
    _, v_a, v_b, na, nb = cosine_directions(g_a, g_b)
    _, hva = torch.autograd.functional.hvp(functional_loss(xa, ya), tuple(p.detach() for p in params), tuple(v_a))
    _, hvb = torch.autograd.functional.hvp(functional_loss(xb, yb), tuple(p.detach() for p in params), tuple(v_b))
    independent = [x / na + y / nb for x, y in zip(hva, hvb)]
    assert rel_err(exact, independent) < 1e-6  # RMSNorm and RoPE compute in fp32 even in fp64 models


def test_finite_difference_matches_exact_and_restores_params():
    model = tiny_llama(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss_a, loss_b = loss_fns(model)
    exact = exact_sd_grad(params, loss_a, loss_b)
    g_a, g_b = grads_of(loss_a(), params), grads_of(loss_b(), params)
    calls = []

    def recording_reduce(ts):
        calls.append(len(ts))
        return all_reduce_mean_(ts)

    errors = {}
    for eps in (1e-1, 1e-2, 1e-3):
        est, stats = finite_difference_sd_grad(params, lambda: grads_of(loss_a(), params),
                                               lambda: grads_of(loss_b(), params), g_a, g_b, eps,
                                               reduce=recording_reduce)
        errors[eps] = rel_err(est, exact)
        assert all(torch.equal(p, b) for p, b in zip(params, before)), "params not restored exactly"
    assert cosine(est, exact) >= 0.999 and errors[1e-3] <= 1e-2, errors
    assert errors[1e-2] < errors[1e-1] / 3, errors  # forward difference: error ~ eps
    assert calls == [len(params)] * 6  # both perturbed gradients go through the reduce hook
    assert math.isclose(stats["cosine"], cosine(g_a, g_b), rel_tol=1e-5)
    assert stats["norm_a"] > 0 and stats["norm_b"] > 0 and not stats["skipped"]
    assert math.isclose(stats["est_norm"], float(global_norm(est)), rel_tol=1e-6)


def _tiny_setup():
    """(params, a copy of them, loss_a, loss_b, g_a, g_b) on a fresh tiny Llama."""
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss_a, loss_b = loss_fns(model)
    return params, before, loss_a, loss_b, grads_of(loss_a(), params), grads_of(loss_b(), params)


def test_in_place_second_pass_equals_the_two_buffer_form():
    """loss_b_fn: the second pass accumulates into the estimate (g_b consumed); same estimate, same restore."""
    params, before, loss_a, loss_b, g_a, g_b = _tiny_setup()
    exact = exact_sd_grad(params, loss_a, loss_b)
    two, _ = finite_difference_sd_grad(params, lambda: grads_of(loss_a(), params), lambda: grads_of(loss_b(), params),
                                       g_a, [g.clone() for g in g_b], 1e-3)
    consumed = [g.clone() for g in g_b]
    one, stats = finite_difference_sd_grad(params, lambda: grads_of(loss_a(), params), None, g_a, consumed, 1e-3,
                                           loss_b_fn=loss_b)
    assert consumed == []
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "params not restored exactly"
    assert rel_err(one, two) < 1e-4, rel_err(one, two)
    assert abs(rel_err(one, exact) - rel_err(two, exact)) < 1e-4
    assert all(p.grad is None for p in params)


def test_params_restored_when_gradient_pass_fails():
    params, before, loss_a, loss_b, g_a, g_b = _tiny_setup()

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        finite_difference_sd_grad(params, boom, boom, g_a, g_b, 1e-3)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_zero_gradient_is_skipped():
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    zeros = [torch.zeros_like(p) for p in params]
    est, stats = finite_difference_sd_grad(params, lambda: zeros, lambda: zeros, zeros, zeros, 1e-3)
    assert stats["skipped"] and float(global_norm(est)) == 0.0


