"""TAR (tamper-resistant safeguards): train so that the model is still safe AFTER a simulated harmful fine-tune.

Tamirisa et al., "Tamper-Resistant Safeguards for Open-Weight LLMs" (ICLR 2025), Section 4 and Algorithm 1:
each outer step runs an inner attack of K SGD steps on the harmful loss from the current weights w, takes the
gradient of a tamper-resistance loss L_TR at the attacked weights w_K (first order: d L_TR(w_K) / d w_K is applied
to w, the attack is not differentiated through) and adds the gradient of a retain loss at w:

    g = grad L_retain(w) + lam_tr * mean_{k in S} grad L_TR(w_k),   w_{k+1} = w_k - inner_lr * grad h(w_k),  w_0 = w

S = the inner steps every `tr_every` (the paper accumulates L_TR along the attack; tr_every = K takes only w_K).
L_TR here is the paper's loss for restricting harmful knowledge: the negative entropy of the next-token
distribution on the harmful answers (minimising it keeps the attacked model's harmful predictions flat, so the
attacker's CE cannot fall). L_retain = CE(benign) + refusal_weight * CE(refusal) keeps capability and refusals.
The weights are restored bit-exactly after the inner attack (perturbation.perturbed).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.functional.grad_math import IGNORE, all_reduce_mean_, global_norm, grads_of
from immunize.lightning_modules.multi_pass import MultiPassDefense
from immunize.lightning_modules.functional.perturbation import perturbed

Reduce = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


def negative_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over supervised next-token positions (labels[:, 1:] != -100) of sum_v p log p (= -entropy), in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    neg_entropy = (logp.exp() * logp).sum(-1)
    mask = (labels[:, 1:] != IGNORE).to(neg_entropy.dtype)
    return (neg_entropy * mask).sum() / mask.sum().clamp(min=1)


def tar_gradient(params: Sequence[torch.Tensor], harmful_loss: Callable[[], torch.Tensor],
                 retain_loss: Callable[[], torch.Tensor], tr_loss: Callable[[], torch.Tensor], inner_steps: int,
                 inner_lr: float, lam_tr: float, tr_every: int, reduce: Reduce = all_reduce_mean_) -> tuple[list, dict]:
    """The TAR gradient of the module docstring, averaged over ranks, and stats (floats).

    Every inner step's harmful gradient is reduced before the step, so all ranks attack identically; the retain
    and L_TR gradients enter the final reduce. Memory beyond the weights: the retain gradient, one weight backup,
    one inner gradient at a time and the L_TR accumulator.
    """
    params = list(params)
    retain = retain_loss()
    total = grads_of(retain, params)
    stats = {"retain": float(retain.detach())}
    del retain
    taken, tr_values, harmful_values = 0, [], []
    tr_grad = None
    with perturbed(params) as shift:
        for k in range(inner_steps):
            h = harmful_loss()
            harmful_values.append(float(h.detach()))
            shift.add(list(reduce(grads_of(h, params))), -inner_lr)
            del h
            if (k + 1) % tr_every == 0 or (k == inner_steps - 1 and taken == 0):
                tr = tr_loss()
                tr_values.append(float(tr.detach()))
                g = grads_of(tr, params)
                tr_grad = g if tr_grad is None else [a.add_(b) for a, b in zip(tr_grad, g)]
                taken += 1
                del tr, g
    with torch.no_grad():
        for t, g in zip(total, tr_grad):
            t.add_(g, alpha=lam_tr / taken)
    del tr_grad
    stats.update({"harmful_first": harmful_values[0], "harmful_last": harmful_values[-1],
                  "L_TR": sum(tr_values) / len(tr_values)})
    grads = list(reduce(total))
    stats["grad_norm"] = float(global_norm(grads))
    return grads, stats


class TAR(MultiPassDefense):
    """TAR on triplet batches: inner harmful-SFT attack on `harmful`, L_TR on `harmful` at the attacked weights,
    retain loss on `benign` and `refusal` at the current weights (see the module docstring).

    Args:
        inner_steps: K, SGD steps of the simulated attack per outer step (the paper's 64; 4 on the toy world).
        inner_lr: the simulated attack's learning rate.
        lam_tr: weight of the tamper-resistance gradient (the paper's 4 for knowledge restriction).
        tr_every: take L_TR's gradient every this many inner steps (K: only at the attacked weights w_K).
        refusal_weight: weight of the refusal CE in the retain loss (0: benign CE only, as the paper's retain set).
        grad_clip, accumulate, **kwargs: MultiPassDefense and CausalLMModule.
    """

    precision_reason = "its inner attack moves fp32 master weights and it computes gradients without a loss scaler"

    def __init__(self, inner_steps: int = 4, inner_lr: float = 1e-3, lam_tr: float = 4.0, tr_every: int = 0,
                 refusal_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise UserError(f"TAR inner_steps must be an integer >= 1, got {inner_steps}")
        for name, value in (("inner_lr", inner_lr), ("lam_tr", lam_tr), ("refusal_weight", refusal_weight)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"TAR {name} must be a finite number >= 0, got {value}")
        if int(tr_every) != tr_every or tr_every < 0:
            raise UserError(f"TAR tr_every must be an integer >= 0 (0: only at the attacked weights), got {tr_every}")
        self.inner_steps, self.inner_lr, self.lam_tr = int(inner_steps), float(inner_lr), float(lam_tr)
        self.tr_every = int(tr_every) or self.inner_steps
        self.refusal_weight = float(refusal_weight)

    def step_gradient(self, batch):
        harmful, refusal, benign = require_parts(batch, ("harmful", "refusal", "benign"), "TAR")
        params = self.trainable_parameters()
        w_h, w_r, w_b = self.token_weights(harmful, refusal, benign)

        def retain_loss():
            loss = self.ce(benign, w_b)
            if self.refusal_weight > 0:
                loss = loss + self.refusal_weight * self.ce(refusal, w_r)
            return self.check_finite(loss, "TAR retain loss")

        def tr_loss():
            return negative_entropy(self.run(harmful).logits, harmful["labels"]) * w_h

        grads, stats = tar_gradient(params, lambda: self.ce(harmful, w_h), retain_loss, tr_loss, self.inner_steps,
                                    self.inner_lr, self.lam_tr, self.tr_every)
        logs = {"L_retain": stats["retain"], "L_TR": stats["L_TR"], "inner_harmful_first": stats["harmful_first"],
                "inner_harmful_last": stats["harmful_last"], "grad_norm/step": stats["grad_norm"]}
        logs["loss"] = stats["retain"] + self.lam_tr * stats["L_TR"]
        return grads, logs
