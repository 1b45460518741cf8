"""Random-perturbation baseline: add N(0, sigma^2) noise to the fine-tuned trainable weights at fit end.

The Panacea paper's motivating observation: random noise on a harmfully fine-tuned model already lowers
its harmful score, at a cost in task accuracy; sweeping sigma traces that trade-off, which Panacea's
optimised perturbation improves on. The noise is drawn on the CPU from a generator seeded with `seed`
alone, parameter by parameter in a fixed order, so every DDP rank (and every device type) adds the
same noise. With LoRA only the adapter tensors (the trainable ones) get noise.
"""
from __future__ import annotations

from typing import Optional

import torch

from immunize.callbacks.base import FinetuneDefense
from immunize.errors import UserError
from immunize.lightning_modules.modeling.sharding import like


def gaussian_noise(params, sigma: float, seed: int) -> list[torch.Tensor]:
    """N(0, sigma^2) tensors shaped like params (fp32, CPU), a pure function of (shapes, sigma, seed)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32) * sigma for p in params]


class RandomPerturbation(FinetuneDefense):
    """At fit end, w += N(0, sigma^2) on every trainable tensor, exactly once.

    Args:
        sigma: standard deviation of the noise (0: no change).
        seed: the noise's seed (the same noise on every rank and device).
        norm: if set, the noise is rescaled to this global L2 norm over all trainable tensors (a random direction
            of a given length: Panacea's eps has norm rho, so norm = rho is its same-norm random baseline);
            sigma must then be > 0 (it no longer sets the size).
    """

    def __init__(self, sigma: float = 0.01, seed: int = 0, norm: Optional[float] = None):
        if not sigma >= 0:
            raise UserError(f"RandomPerturbation: sigma must be >= 0, got {sigma}")
        if norm is not None and not (norm >= 0 and sigma > 0):
            raise UserError(f"RandomPerturbation: norm must be >= 0 (with sigma > 0), got norm {norm}, sigma {sigma}")
        super().__init__(seed=seed)
        self.sigma, self.norm = float(sigma), norm
        self.noise_norm: Optional[float] = None

    def apply(self, trainer, pl_module) -> None:
        params = pl_module.trainable_parameters()
        noise = gaussian_noise(params, self.sigma, self.seed)
        if self.norm is not None:
            total = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n) for n in noise])))
            noise = [n * (self.norm / total) for n in noise] if total > 0 else noise
        with torch.no_grad():
            for p, n in zip(params, noise):
                p.add_(like(n, p))  # under FSDP: this rank's shard of the same full noise
        self.noise_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(n) for n in noise])))
