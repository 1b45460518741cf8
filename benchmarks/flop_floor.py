"""The matmul FLOPs a method's training step needs, from the model's shapes, in SFT steps (its floor).

Units: F = one forward of a batch part = the trunk (every token through every linear layer and attention) plus
the head on the supervised positions only; a full backward (input and weight gradients) is 2F, a backward to the
hidden states only is about 1F. A logit-lens term is one more head projection of the supervised positions:
3 head-FLOPs per term with its backward. SFT's step is 3F. Each method's recipe below counts its passes as the
algorithm needs them (what a perfect implementation would do), so measured time / floor is the overhead of ours.
Elementwise work (norms, softmax, optimizer, perturbation updates) is not counted: it is not a matmul, and on
every backend it is a small share of these steps.
step_cost.py's StepFlops counts the matmul FLOPs our implementation really runs (torch's FlopCounterMode), so
counted / floor shows any projection we do that the algorithm does not need.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.shapes import ModelShape  # noqa: E402


@dataclass(frozen=True)
class StepShape(ModelShape):
    """The model's shapes (shapes.ModelShape) and the batch part's tokens (every part of a step has the same shape).

    Args:
        batch, length: the batch part's rows and tokens per row.
        supervised: supervised positions in one batch part (the head's rows).
    """

    batch: int = 1
    length: int = 1
    supervised: int = 1

    @classmethod
    def of(cls, config, batch: int = 1, length: int = 1, supervised: int = 1) -> "StepShape":
        """From a Hugging Face Llama-style config (a config object or a dict)."""
        return cls(**ModelShape.sizes(config), batch=batch, length=length, supervised=supervised)

    def trunk_forward(self) -> float:
        """Linear layers (q, k, v, o, gate, up, down) on every token, and attention's two T x T products."""
        tokens = self.batch * self.length
        attention = 4 * self.batch * self.length ** 2 * self.heads * self.head_dim
        return self.layers * (2 * tokens * self.linear_params() + attention)

    def head_forward(self) -> float:
        return 2.0 * self.supervised * self.hidden * self.vocab

    def forward(self) -> float:
        return self.trunk_forward() + self.head_forward()


def _seam(s: StepShape, hp) -> float:
    f = s.forward()
    total = 0.0
    need_sd = hp.get("beta", 0.01) > 0
    unlearn = hp.get("use_unlearning", True)
    if need_sd or unlearn:
        total += f  # the harmful forward serves g_a and L_ul
    if need_sd:
        total += 2 * f  # g_a
        total += 3 * f + 2 * 3 * f  # g_b, then g_a and g_b at the perturbed weights
    if unlearn:
        total += 2 * f + 3 * s.layers * s.head_forward()  # L_ul's backward and its L lens terms
    if hp.get("alpha", 1.0) > 0:
        total += 3 * f  # L_up
    return total


def _repnoise(s: StepShape, hp) -> float:
    f = s.forward()
    lens = 3 * s.layers * s.head_forward() if hp.get("alpha", 1.0) > 0 else 0.0
    return 3 * f + 3 * f + lens  # refusal CE; harmful forward + backward (H and L_noise), and the lens terms


def _tar(s: StepShape, hp) -> float:
    k = int(hp.get("inner_steps", 4))
    every = int(hp.get("tr_every", 0)) or k
    parts = 2 if hp.get("refusal_weight", 1.0) > 0 else 1
    retain = 3 * parts * s.forward()  # benign (+ refusal) CE: a forward and a backward each
    return retain + k * 3 * s.forward() + max(1, k // every) * 3 * s.forward()  # inner steps; L_TR at w_k


# method -> FLOPs of one step from (shape, the module's hyper-parameters)
RECIPES: dict[str, Callable[[StepShape, dict], float]] = {
    "sft": lambda s, hp: 3 * s.forward(),
    "seam": _seam,
    "repnoise": _repnoise,
    "adversarial": lambda s, hp: 2 * 3 * s.forward(),  # refusal and harmful CE, one backward of their sum
    "booster": lambda s, hp: 3 * 3 * s.forward(),  # g_h, g_h at the stepped weights, L_align
    "vaccine": lambda s, hp: 2 * s.forward() + 3 * s.forward(),  # forward + backward to hidden states; perturbed pass
    # Vaccine's step, and a forward + backward to the hidden states every probability_every steps (amortised)
    "t_vaccine": lambda s, hp: 5 * s.forward() + 2 * s.forward() / max(1, int(hp.get("probability_every", 200))),
    "tar": _tar,
    "panacea": lambda s, hp: 3 * 3 * s.forward(),  # task pass, harmful pass at w, harmful pass at w + eps
    "lisa": lambda s, hp: 3 * s.forward(),  # one pass; the proximal term is elementwise
}


def floor_in_sft_steps(method: str, shape: StepShape, hparams: Optional[dict] = None) -> Optional[float]:
    """The method's FLOP floor divided by SFT's (None for a method without a recipe)."""
    recipe = RECIPES.get(method)
    if recipe is None:
        return None
    return recipe(shape, dict(hparams or {})) / RECIPES["sft"](shape, {})
