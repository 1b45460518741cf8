"""Flat-gradient helpers over a list of trainable parameters (fp32 or wider math, DDP- and FSDP2-aware).

A "gradient" here is a list of tensors shaped like the parameter list; dot products and norms
are taken over all of them at once, as if the parameters were one flattened vector. Under FSDP2
the tensors are shards (DTensors): gradients come from a backward through FSDP's hooks, and dot
products and norms sum each rank's partial over the ranks (immunize.lightning_modules.modeling.sharding).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from immunize.errors import UserError
from immunize.lightning_modules.modeling.sharding import any_sharded, drop_gathered, is_sharded, local, shard_group, shard_sum, sharded_grads

IGNORE = -100
EXACT_DTYPES = (torch.float32, torch.float64)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in at least fp32 (fp64 stays fp64): norms and differences must not be taken in bf16/fp16."""
    return t if t.dtype in EXACT_DTYPES else t.float()


def grads_of(loss: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False,
             retain_graph: bool = False) -> list[torch.Tensor]:
    """d loss / d params as a list (zeros for parameters the loss does not reach), in fp32 or wider.

    FSDP2-sharded params: the gradient's shards, already averaged over ranks (one backward through FSDP's
    hooks); there a graph cannot be kept for a second backward nor differentiated twice.
    """
    if any_sharded(params):
        if create_graph or retain_graph:
            raise UserError("a second backward through one forward (retain_graph / create_graph) is not possible on "
                            "FSDP-sharded weights; use the finite-difference estimator, or train without FSDP")
        return [_wide(g) for g in sharded_grads(loss, params)]
    grads = torch.autograd.grad(loss, list(params), create_graph=create_graph,
                                retain_graph=retain_graph or create_graph, allow_unused=True)
    return [_wide(torch.zeros_like(p)) if g is None else _wide(g) for g, p in zip(grads, params)]


def accumulate_grads_(loss: torch.Tensor, params: Sequence[torch.Tensor], buffers: list) -> list[torch.Tensor]:
    """buffers[i] += d loss / d params[i] in place, by one backward that accumulates into them as p.grad; returns the
    buffers as a new list and EMPTIES `buffers` (only p.grad may refer to a buffer during the backward, or autograd
    adds out of place and a gradient-sized temporary appears). Under FSDP2 the buffers are shards and what is added
    is the rank mean (the reduce-scatter), as with grads_of. Gradients accumulating in p.grad are put back.

    Saves the memory of a separate gradient when only a sum is wanted; buffers must have the parameters' dtype.
    """
    params = list(params)
    if len(buffers) != len(params):
        raise ValueError(f"accumulate_grads_: {len(buffers)} buffers for {len(params)} parameters")
    for p, b in zip(params, buffers):
        if b.dtype != p.dtype or b.shape != p.shape:
            raise ValueError(f"accumulate_grads_: a buffer {b.dtype} {tuple(b.shape)} for a parameter {p.dtype} "
                             f"{tuple(p.shape)}")
    kept = [p.grad for p in params]
    for p, b in zip(params, buffers):
        p.grad = b
    buffers.clear()
    try:
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, kept):
            p.grad = g


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over all tensors of <a_i, b_i>, accumulated in fp32 (or fp64), as one scalar."""
    if len(a) != len(b):
        raise ValueError(f"dot: lists differ in length ({len(a)} vs {len(b)})")
    if not a:
        raise ValueError("dot: empty parameter list")
    return _over_shards(a, lambda x, y: torch.dot(_wide(x).reshape(-1), _wide(y).reshape(-1)), b)


def global_norm(a: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of all tensors together (norm of per-tensor norms: no overflow), fp32 or wider."""
    if not a:
        raise ValueError("global_norm: empty parameter list")
    if any_sharded(a):  # sum of squares over shards and ranks
        return _over_shards(a, lambda x: torch.linalg.vector_norm(_wide(x)).pow(2)).sqrt()
    device = a[0].device
    parts = [torch.linalg.vector_norm(_wide(x)).to(device) for x in a]
    return torch.linalg.vector_norm(torch.stack(parts))


def _over_shards(a: Sequence[torch.Tensor], term, b: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Sum over tensors of term(a_i[, b_i]) on this rank's parts; the sharded tensors' share summed over the ranks."""
    pairs = list(zip(a, b)) if b is not None else [(x,) for x in a]
    device = local(a[0]).device
    shared = [term(*(local(t) for t in pair)).to(device) for pair in pairs if not is_sharded(pair[0])]
    sharded = [term(*(local(t) for t in pair)).to(device) for pair in pairs if is_sharded(pair[0])]
    total = torch.stack(shared).sum() if shared else torch.zeros((), device=device, dtype=torch.float32)
    if sharded:
        total = total + shard_sum(torch.stack(sharded).sum(), shard_group(a))
    return total


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """Average tensors in place across torch.distributed ranks (no-op when not distributed).

    Norms and cosines must be taken on the averaged gradients so every rank computes the same
    numbers and takes the same perturbation step. FSDP2 shards are skipped: a sharded gradient is
    already the rank mean (reduce-scatter), and different ranks hold different shards.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    world = dist.get_world_size()
    if world == 1:
        return tensors
    plain = [t for t in tensors if not is_sharded(t)]
    handles = [dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True) for t in plain]
    for handle, t in zip(handles, plain):
        handle.wait()
        t.div_(world)
    return tensors


FP32_MASTER_PRECISIONS = ("32-true", "32", "64-true", "64", "bf16-mixed")


def require_fp32_master_precision(precision, method: str, why: str) -> None:
    """Refuse trainer precisions without fp32 master weights or that need a loss scaler (manual passes skip it)."""
    if str(precision) not in FP32_MASTER_PRECISIONS:
        raise UserError(f"{method} cannot train with trainer.precision {str(precision)!r}: {why}; use one of "
                        f"{list(FP32_MASTER_PRECISIONS)}, e.g. bf16-mixed on GPUs")


_INEXACT_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("inexact_weights_allowed", default=False)


@contextlib.contextmanager
def inexact_weights_allowed() -> Iterator[None]:
    """Inside the block, weight perturbations of bf16/fp16 parameters are allowed (require_exact_params passes):
    for reproducing a reference that trains in pure bf16 (SEAM's precision "reference_bf16"), never a default."""
    token = _INEXACT_ALLOWED.set(True)
    try:
        yield
    finally:
        _INEXACT_ALLOWED.reset(token)


def require_exact_params(params: Sequence[torch.Tensor]) -> None:
    """Raise UserError unless every parameter is fp32/fp64 (small weight perturbations need fine weights), except
    inside inexact_weights_allowed()."""
    if _INEXACT_ALLOWED.get():
        return
    for p in params:
        if p.dtype not in EXACT_DTYPES:
            raise UserError(
                f"weight perturbations need fp32 parameters, found a {p.dtype} parameter of shape "
                f"{tuple(p.shape)}: a finite-difference or normalised step of about 1e-8 to 1e-6 per element "
                "rounds away in bf16/fp16 weights (resolution about 1e-4 near 0.02), so the method would compute "
                "noise. Keep fp32 master weights: load the model in float32 and train with precision "
                "\"bf16-mixed\" (or \"32-true\"), not \"bf16-true\"/\"16-true\", or train LoRA adapters (they "
                "stay fp32) over a bfloat16 base.")


@torch.no_grad()
def add_scaled_(params: Sequence[torch.Tensor], direction: Sequence[torch.Tensor], scale: float) -> None:
    """In place p.data += scale * d for every parameter (math in the parameter's fp32/fp64)."""
    require_exact_params(params)
    for p, d in zip(params, direction):
        p.data.add_(d.to(device=p.device, dtype=p.dtype), alpha=float(scale))
    if any_sharded(params):
        drop_gathered()  # the weights changed: no forward may reuse weights FSDP gathered before


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labels != -100 (logits[:, :-1] predict labels[:, 1:]), in fp32.

    Returns 0 (still attached to the graph) when no label is active, instead of NaN.
    """
    shift_logits = _wide(logits[:, :-1]).reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    count = (shift_labels != IGNORE).sum().clamp(min=1)
    return total / count


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean next-token CE over each row's labels != -100, in fp32 ([batch]; 0 for a row without labels)."""
    shift_labels = labels[:, 1:]
    per_token = F.cross_entropy(_wide(logits[:, :-1]).transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
    counts = (shift_labels != IGNORE).sum(1)
    return per_token.sum(1) / counts.clamp(min=1)
