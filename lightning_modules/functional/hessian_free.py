"""Gradient of SEAM's L_sd = cos(g_a, g_b): Hessian-free forward-difference estimate (paper Eq. 6) and exact check.

Exact: grad L_sd = H_a v_a / |g_a| + H_b v_b / |g_b| with u = g/|g|, c = u_a.u_b,
v_a = u_b - c u_a, v_b = u_a - c u_b. Since H v ~ (g(theta + eps v) - g(theta)) / eps, two extra
gradient passes at perturbed weights (same batches) replace the Hessian-vector products.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from immunize.lightning_modules.functional.grad_math import (_wide, accumulate_grads_, all_reduce_mean_, dot, global_norm, grads_of,
                                         require_exact_params)
from immunize.lightning_modules.functional.perturbation import perturbed

GradList = list[torch.Tensor]
Reduce = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def _cosine_stats(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor]):
    """(c, |g_a|, |g_b|) as 0-dim fp32+ tensors; c is 0 when a norm is 0."""
    norm_a, norm_b = global_norm(g_a), global_norm(g_b)
    denom = norm_a * norm_b
    c = torch.where(denom > 0, dot(g_a, g_b) / torch.where(denom > 0, denom, torch.ones_like(denom)),
                    torch.zeros_like(denom))
    return c, norm_a, norm_b


@torch.no_grad()
def cosine_directions(g_a: Sequence[torch.Tensor], g_b: Sequence[torch.Tensor]):
    """(c, v_a, v_b, |g_a|, |g_b|): cosine of the two gradients and the directions of SEAM Eq. 6, in fp32+.

    v_a = u_b - c u_a and v_b = u_a - c u_b, with u = g/|g|; both have norm sqrt(1 - c^2).
    """
    c, norm_a, norm_b = _cosine_stats(g_a, g_b)
    inv_a, inv_b, cf = 1.0 / float(norm_a), 1.0 / float(norm_b), float(c)
    v_a = [gb * inv_b - ga * (cf * inv_a) for ga, gb in zip(g_a, g_b)]
    v_b = [ga * inv_a - gb * (cf * inv_b) for ga, gb in zip(g_a, g_b)]
    return c, v_a, v_b, norm_a, norm_b


def finite_difference_sd_grad(params: Sequence[torch.Tensor], grad_a_fn: Callable[[], Sequence[torch.Tensor]],
                              grad_b_fn: Callable[[], Sequence[torch.Tensor]], g_a: Sequence[torch.Tensor],
                              g_b: Sequence[torch.Tensor], eps: float = 1e-3,
                              reduce: Reduce = all_reduce_mean_,
                              loss_b_fn: Optional[Callable[[], torch.Tensor]] = None) -> tuple[GradList, dict]:
    """Forward-difference estimate of grad cos(g_a, g_b) (SEAM Eq. 6); params are restored bit-exactly.

    g_a, g_b: gradients at the current weights, ALREADY reduced across ranks. grad_a_fn/grad_b_fn:
    recompute the local gradient of the same loss on the SAME batch at the current weights and
    return fresh tensors (e.g. from grads_of; they are reused as buffers); `reduce` averages them
    across ranks (default all_reduce_mean_), so every rank takes the same perturbation and estimate.
    Under DDP run these passes on the unwrapped module (ddp.module) so DDP's own reducer stays out.
    Memory: besides g_a and g_b, one fp32 copy of the parameters (for the exact restore), the
    estimate (the buffer grad_a_fn returned) and, transiently, the perturbed g_b: 3 extra
    model-sized buffers where the reference keeps 6 in all. v_a, v_b are never materialised.
    loss_b_fn (instead of grad_b_fn; then g_b must be a list, which is EMPTIED): the local loss b at the current
    weights. The second pass then adds its gradient straight into the estimate (est * nb eps - g_b, then
    += grad at theta + eps v_b by autograd's in-place accumulation, reduced, / nb eps), so neither g_b nor the
    perturbed gradient is held during it: the peak is the first pass's g_a, g_b, backup and estimate, one buffer
    fewer (rounding as the two-buffer form: the cancelling terms meet in fp32 either way).
    Returns (est, stats) with stats floats: cosine, norm_a, norm_b, est_norm (and skipped=True
    with a zero estimate when a gradient is zero, where the cosine has no gradient).
    """
    params = list(params)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    require_exact_params(params)
    c, norm_a, norm_b = _cosine_stats(g_a, g_b)
    cf, na, nb = float(c), float(norm_a), float(norm_b)
    stats = {"cosine": cf, "norm_a": na, "norm_b": nb, "est_norm": 0.0, "skipped": False}
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
        stats["skipped"] = True
        return [torch.zeros_like(g) for g in g_a], stats

    with perturbed(params) as shift:
        shift.add(g_b, eps / nb).add(g_a, -eps * cf / na)  # theta + eps * v_a, v_a never materialised
        est = [_wide(t) for t in reduce(list(grad_a_fn()))]
        shift.restore()
        if any(e is g for e, g in zip(est, g_a)):
            raise ValueError("grad_a_fn must return fresh tensors, not g_a itself")
        with torch.no_grad():
            for e, g in zip(est, g_a):
                e.sub_(g).mul_(1.0 / (na * eps))
        shift.add(g_a, eps / na).add(g_b, -eps * cf / nb)  # theta + eps * v_b
        if loss_b_fn is not None and all(e.dtype == p.dtype for e, p in zip(est, params)):
            with torch.no_grad():
                for e, g in zip(est, g_b):
                    e.mul_(nb * eps).sub_(g)
                del e, g  # no name may hold a buffer: autograd then adds in place
            g_b.clear()  # the caller's g_b list: its buffers are free from here on
            est = list(reduce(accumulate_grads_(loss_b_fn(), params, est)))
            shift.restore()
            with torch.no_grad():
                for e in est:
                    e.mul_(1.0 / (nb * eps))
        else:
            g_b_moved = [_wide(t) for t in reduce(list(grad_b_fn() if loss_b_fn is None else
                                                       grads_of(loss_b_fn(), params)))]
            shift.restore()
            with torch.no_grad():
                for e, moved, g in zip(est, g_b_moved, g_b):
                    e.add_(moved.sub_(g), alpha=1.0 / (nb * eps))
            del g_b_moved
    stats["est_norm"] = float(global_norm(est))
    return est, stats


def exact_sd_grad(params: Sequence[torch.Tensor], loss_a_fn: Callable[[], torch.Tensor],
                  loss_b_fn: Callable[[], torch.Tensor]) -> GradList:
    """Exact grad of cos(g_a, g_b) by double backward, for verification (single process: no all-reduce)."""
    params = list(params)
    g_a = grads_of(loss_a_fn(), params, create_graph=True)
    g_b = grads_of(loss_b_fn(), params, create_graph=True)
    cosine = dot(g_a, g_b) / (global_norm(g_a) * global_norm(g_b))
    return [g.detach() for g in grads_of(cosine, params)]
