"""The two primitives every multi-pass method is built from: a normalised direction and a weight shift that is
undone bit-exactly.

- `normalized(grads, rho)`: rho * g / (|g| + 1e-7) with one global L2 norm over all tensors (Panacea's eps,
  Booster's harmful step, Vaccine's hidden-state perturbation, TAR's and SEAM's directions).
- `perturbed(params)`: a context manager in which the weights may be moved (`shift.add(direction, scale)`,
  any number of times) and put back (`shift.restore()`); on leaving, by return or by exception, every weight is
  copied back from a backup, so the restore is exact to the bit (subtracting the step again would not be, in
  floating point). The backup is one fp32 copy of the moved tensors.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from immunize.lightning_modules.functional.grad_math import add_scaled_, global_norm, require_exact_params
from immunize.lightning_modules.modeling.sharding import any_sharded, drop_gathered

NORM_EPS = 1e-7  # as in every reference implementation: rho * g / (|g| + 1e-7)


def normalized(grads: Sequence[torch.Tensor], rho: float, norm: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """rho * g / (|g| + 1e-7) as new fp32 tensors (never aliases of `grads`).

    norm: |g| when it is not the local norm of `grads` (e.g. a norm over all DDP ranks' shares); default
    global_norm(grads).
    """
    scale = rho / ((global_norm(grads) if norm is None else norm) + NORM_EPS)
    return [g.float() * scale for g in grads]


class WeightShift:
    """Moves a fixed list of weights away from a saved point and back (see `perturbed`)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        require_exact_params(self.params)
        self._backup = [p.detach().clone() for p in self.params]

    def add(self, direction: Sequence[torch.Tensor], scale: float = 1.0) -> "WeightShift":
        """p += scale * d for every weight (in the weight's fp32/fp64)."""
        add_scaled_(self.params, direction, scale)
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """Every weight back to the saved point, bit-exactly."""
        for p, saved in zip(self.params, self._backup):
            p.copy_(saved)
        if any_sharded(self.params):
            drop_gathered()  # the weights changed: no forward may reuse weights FSDP gathered before

    def release(self) -> None:
        self._backup = []


@contextmanager
def perturbed(params: Sequence[torch.Tensor], direction: Optional[Sequence[torch.Tensor]] = None,
              scale: float = 1.0) -> Iterator[WeightShift]:
    """Inside the block the weights are `params + scale * direction` (or unmoved when direction is None) and may
    be moved further through the yielded WeightShift; on exit they are restored bit-exactly."""
    shift = WeightShift(params)
    try:
        if direction is not None:
            shift.add(direction, scale)
        yield shift
    finally:
        shift.restore()
        shift.release()
