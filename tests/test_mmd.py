"""RepNoise's L_noise: MMD^2 with Gaussian kernels against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from immunize.lightning_modules.functional.mmd import mmd2, noise_mmd


# ----- MMD (RepNoise's L_noise) ------------------------------------------------------------------------
def test_mmd2_matches_a_hand_computed_value():
    """x = {0, 2}, y = {0, 0} in 1-D. Pooled squared distances: 4 between the 2 and each 0 (6 of the 12 ordered
    distinct pairs), else 0: mean b = 24 / 12 = 2, bandwidths b/4 .. 4b = 0.5, 1, 2, 4, 8. With
    s = k(d^2 = 4) = e^-8 + e^-4 + e^-2 + e^-1 + e^-0.5 and k(0) = 5: mean K_xx = (10 + 2s) / 4, mean K_yy = 5,
    mean K_xy = (10 + 2s) / 4, so MMD^2 = 5 - (5 + s) / 2 = (5 - s) / 2."""
    s = sum(math.exp(-4.0 / b) for b in (0.5, 1.0, 2.0, 4.0, 8.0))
    value = mmd2(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [0.0]]))
    assert float(value) == pytest.approx((5.0 - s) / 2.0, rel=1e-6)
    assert float(value) == pytest.approx(1.9358021, rel=1e-6)


def test_mmd2_single_bandwidth_unequal_sizes_and_identity():
    """One kernel (bandwidth = mean distinct-pair distance): x = {(0,0)}, y = {(3,0), (0,4)}. Pooled squared
    distances 9, 16, 25 (each twice): b = 100 / 6. MMD^2 = 1 + (2 + 2 e^{-25/b}) / 4 - 2 (e^{-9/b} + e^{-16/b}) / 2."""
    b = 100.0 / 6.0
    expected = 1.0 + (2.0 + 2.0 * math.exp(-25.0 / b)) / 4.0 - (math.exp(-9.0 / b) + math.exp(-16.0 / b))
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert float(mmd2(x, y, kernel_num=1)) == pytest.approx(expected, rel=1e-6)
    z = torch.randn(5, 7, dtype=torch.float64)
    assert float(mmd2(z, z)) == pytest.approx(0.0, abs=1e-12)


def test_noise_mmd_ignores_masked_positions():
    hidden = torch.randn(3, 4, 5)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    other = hidden.clone()
    other[~mask] = 100.0  # prompt/padding activations must not matter
    a = noise_mmd(hidden, mask, generator=torch.Generator().manual_seed(1))
    b = noise_mmd(other, mask, generator=torch.Generator().manual_seed(1))
    assert float(a) == float(b) and float(a) > 0


