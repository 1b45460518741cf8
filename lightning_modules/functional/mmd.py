"""Squared maximum mean discrepancy with a sum of Gaussian kernels (RepNoise's L_noise), as plain functions."""
from __future__ import annotations

from typing import Optional

import torch

TINY = 1e-12


def _from_gram(gram: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor, same: bool) -> torch.Tensor:
    """Squared distances from inner products: |a|^2 + |b|^2 - 2 <a, b>, clamped at 0; diagonal exactly 0 if same."""
    d2 = (sq_a[:, None] + sq_b[None, :] - 2.0 * gram).clamp_min(0.0)
    if same:
        d2 = d2 * (1.0 - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    return d2


def mmd2(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 between samples x [n, d] and y [m, d], in fp32 or wider.

    k(a, c) = sum_i exp(-|a - c|^2 / b_i) with kernel_num bandwidths b_i = b * kernel_mul**(i - kernel_num // 2)
    (5 bandwidths b/4 .. 4b by default), b = the mean squared distance over distinct pairs of the n + m
    pooled samples, taken as a constant (no gradient). MMD^2 = mean K_xx + mean K_yy - 2 mean K_xy;
    for n == m this is the mean of K_xx + K_yy - K_xy - K_yx, as in the RepNoise reference. The three
    blocks are formed separately, so a y without gradient (the noise) costs no backward work.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd2: want x [n, d] and y [m, d], got {tuple(x.shape)} and {tuple(y.shape)}")
    if kernel_num < 1 or kernel_mul <= 0:
        raise ValueError(f"mmd2: kernel_num must be >= 1 and kernel_mul > 0, got {kernel_num}, {kernel_mul}")
    dtype = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    g_xx, g_yy, g_xy = x @ x.T, y @ y.T, x @ y.T  # no [n, m, d] difference tensor
    sq_x, sq_y = g_xx.diagonal(), g_yy.diagonal()
    d_xx, d_yy = _from_gram(g_xx, sq_x, sq_x, True), _from_gram(g_yy, sq_y, sq_y, True)
    d_xy = _from_gram(g_xy, sq_x, sq_y, False)
    total = x.shape[0] + y.shape[0]
    pooled = (d_xx.detach().sum() + d_yy.detach().sum() + 2.0 * d_xy.detach().sum()) / max(total * (total - 1), 1)
    base = pooled.clamp_min(TINY) / kernel_mul ** (kernel_num // 2)

    def kernel(d2):
        return sum(torch.exp(-d2 / (base * kernel_mul ** i)) for i in range(kernel_num))

    return kernel(d_xx).mean() + kernel(d_yy).mean() - 2.0 * kernel(d_xy).mean()


def noise_mmd(hidden: torch.Tensor, mask: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MMD^2 between masked activations [B, T, H] and standard Gaussian noise of the same shape and mask.

    Positions where mask [B, T] is False are zero in both; each sample's T x H values form one vector.
    """
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"noise_mmd: want hidden [B, T, H] and mask [B, T], got {tuple(hidden.shape)}, {tuple(mask.shape)}")
    keep = mask.unsqueeze(-1).to(torch.float32)
    h = hidden.float() * keep
    noise = torch.randn(h.shape, generator=generator, dtype=torch.float32, device=h.device) * keep
    return mmd2(h.reshape(h.shape[0], -1), noise.reshape(h.shape[0], -1), kernel_mul, kernel_num)
