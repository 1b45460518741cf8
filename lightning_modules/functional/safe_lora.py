"""SafeLoRA's math (Hsu et al. 2024, "Safe LoRA"; reference code IBM/SafeLoRA model.py) as plain tensor functions.

For one LoRA-adapted weight W (d_out x d_in) with the adapter's factors B (peft's lora_B, d_out x r) and A (lora_A,
r x d_in), and V = W_aligned - W_base the change that alignment made to that weight:
- `alignment_projector`: C = V V^T / ||V||_F, d_out x d_out. This is the matrix the reference builds (and the paper's
  approximation): the Frobenius norm is not squared, so C is not an orthogonal projector; it keeps V's left singular
  directions weighted by sigma_i^2 / ||V||_F.
- `projected_cosine`: the cosine between the flattened (C B) A and B A (the LoRA update with and without the
  projection; the alpha / r scaling cancels). Computed from r x r Gram matrices in float64, so no d_out x d_in
  product is formed; rounded to 5 decimals as the reference rounds it (numpy.round).
- `selected_modules`: which modules take the projected factor C B: those whose cosine is <= the threshold, where the
  threshold is either given ("threshold" mode) or the k-th smallest cosine ("number" mode; ties may select more).
- `distance_score`: the reference's diagnostic 1 / (1 + ||B_final - C B||) per module (1 for a projected module).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy
import torch

SELECT_MODES = ("number", "threshold")
COSINE_DECIMALS = 5  # the reference rounds every cosine with numpy.round(cos, 5) before comparing it
COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps, which the reference calls


def alignment_projector(w_aligned: torch.Tensor, w_base: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F with V = w_aligned - w_base, in float32 on w_aligned's device. A zero V (alignment did not
    change this weight) gives a matrix of NaN, as in the reference: its cosine is NaN and it is never projected."""
    if w_aligned.dim() != 2 or w_aligned.shape != w_base.shape:
        raise ValueError(f"alignment_projector: two 2-D weights of one shape are needed, got "
                         f"{tuple(w_aligned.shape)} and {tuple(w_base.shape)}")
    v = w_aligned.detach().float() - w_base.detach().to(device=w_aligned.device, dtype=torch.float32)
    norm = torch.linalg.matrix_norm(v)
    c = v @ v.T
    del v
    return c.div_(norm)


def projected_cosine(c: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """cos(flat(C B A), flat(B A)) rounded to 5 decimals (NaN where C is NaN).

    With P = C B and G = A A^T: <P A, B A> = sum((P^T B) * G), |P A|^2 = sum((P^T P) * G), |B A|^2 = sum((B^T B) * G);
    the d_out x r and r x d_in factors are copied to the CPU in float64 for that (small: r is the LoRA rank)."""
    p = (c @ lora_b.detach().float()).to("cpu", torch.float64)
    b = lora_b.detach().to("cpu", torch.float64)
    a = lora_a.detach().to("cpu", torch.float64)
    gram = a @ a.T
    dot = float(((p.T @ b) * gram).sum())
    norm_pa = math.sqrt(max(float(((p.T @ p) * gram).sum()), 0.0))
    norm_ba = math.sqrt(max(float(((b.T @ b) * gram).sum()), 0.0))
    cosine = dot / (max(norm_pa, COSINE_EPS) * max(norm_ba, COSINE_EPS))
    return float(numpy.round(cosine, COSINE_DECIMALS))


def cosine_threshold(cosines: Sequence[float], select: str, num_proj_layers: int, threshold: float) -> float:
    """The cosine at or below which a module is projected: `threshold` ("threshold" mode), or the num_proj_layers-th
    smallest of the cosines that are not NaN ("number" mode; the largest when there are fewer; NaN when none)."""
    if select == "threshold":
        return float(threshold)
    if select != "number":
        raise ValueError(f"select must be one of {SELECT_MODES}, got {select!r}")
    if num_proj_layers < 1:
        raise ValueError(f"num_proj_layers must be >= 1, got {num_proj_layers}")
    finite = sorted(c for c in cosines if not math.isnan(c))
    return finite[:num_proj_layers][-1] if finite else math.nan


def selected_modules(cosines: Sequence[float], threshold: float) -> list[bool]:
    """Per module, whether it takes the projected factor: cosine <= threshold (never for a NaN cosine)."""
    return [c <= threshold for c in cosines]


def distance_score(lora_b: torch.Tensor, projected: torch.Tensor) -> float:
    """1 / (1 + ||lora_b - projected||_F): 1 where the module was projected, smaller the more C moves its factor."""
    return 1.0 / (1.0 + float(torch.linalg.vector_norm(lora_b.detach().float() - projected.float())))
