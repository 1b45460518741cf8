"""SEAM (self-destructive models): alignment after which harmful fine-tuning wrecks the model's capability.

Wang et al., "Self-Destructive Language Model" / SEAM (arXiv 2505.12186), Section 3 (the loss, Eq. 3-5) and
Section 3.3 (the Hessian-free gradient of L_sd, Eq. 6). L = L_ul + alpha L_up + beta L_sd on three batches per
step (harmful, refusal on the same prompts, benign). The math lives in plain functions (logit_lens,
hessian_free, seam_math); this module is the multi-pass step on the MultiPassDefense base.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch

from immunize.datamodules.collate import supervise
from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from lightning.pytorch.utilities import rank_zero_warn

from immunize.lightning_modules.functional.grad_math import (all_reduce_mean_, dot, global_norm, grads_of,
                                                             inexact_weights_allowed)
from immunize.lightning_modules.modeling.sharding import any_sharded
from immunize.lightning_modules.functional.hessian_free import exact_sd_grad, finite_difference_sd_grad
from immunize.lightning_modules.modeling.hidden_hooks import lens_modules
from immunize.lightning_modules.functional.logit_lens import LENS_MEANS, bounded_ascent, logit_lens_ce
from immunize.lightning_modules.multi_pass import MultiPassDefense
from immunize.lightning_modules.functional.global_batch import global_value
from immunize.lightning_modules.functional.supervised_ce import response_forward

ESTIMATORS = ("finite_difference", "exact")
BENIGN_TOKENS = ("response", "sequence")
PRECISIONS = ("fp32_master", "reference_bf16")
REFERENCE_BF16_WARNING = (
    "SEAM precision 'reference_bf16': the finite-difference step eps * v is taken in bf16 weights, as the authors' "
    "code does; at eps 1e-3 most of it rounds away (train/bf16_unmoved_share logs the share of weights the step "
    "leaves unchanged), so L_sd's gradient is mostly rounding noise. For reproducing the reference only.")
PARTS = ("harmful", "refusal", "benign")


class SEAM(MultiPassDefense):
    """SEAM alignment: per step the gradients of L_ul and alpha L_up plus beta * (the L_sd estimate).

    Passes per step (finite_difference): harmful forward with all hidden states and two backwards (g_a and
    L_ul), refusal (L_up), benign (g_b), and g_a, g_b again at perturbed fp32 weights. DDP: g_a, g_b and the
    estimate are all-reduced before use, so all ranks perturb and update identically; per-rank losses are
    token-weighted so the update equals the single-process one on the global batch.
    Logged per step: L_ul, L_up, cos_ab (the training cosine), est_norm, grad_norm/L_ul, grad_norm/L_up and
    sd_share = beta |est| / (|grad L_ul| + alpha |grad L_up|), the share of the update L_sd contributes (the
    quantity a beta should be chosen by: it does not carry over from one model size to another).

    Args:
        alpha: weight of L_up (refusal CE on the harmful prompts); the paper's 1.
        beta: weight of L_sd = cos(g_a, g_b); the paper's 0.01, tuned for bf16 weights where the finite difference mostly rounds away.
        eps: finite-difference step of the Hessian-free estimate; the paper's 1e-3.
        estimator: "finite_difference" (Eq. 6) or "exact" (double backward; single process, for checking).
        use_unlearning: include L_ul = -log(1 + logit-lens harmful CE); false is the "no L_ul" ablation.
        lens_mean: "honest" (the mean of the L + 1 logit-lens terms) or "reference" (the authors' code: the last
            hidden state normalised twice, L + 2 terms divided by L + 1; functional.logit_lens).
        benign_tokens: the tokens of the benign gradient g_b: "response" (ours: the benign answer, as the
            attack and the evaluation read a model) or "sequence" (the reference code: the whole benign text,
            prompt included, padding left out; on short-answer tasks the response is one or two tokens, so the
            two g_b differ most there).
        precision: "fp32_master" (fp32 weights; the trainer's precision 32-true or bf16-mixed) or "reference_bf16"
            (the authors' pure bf16: bf16 weights, trainer precision bf16-true, warned and logged as
            train/bf16_unmoved_share every step; never a default).
        grad_clip, accumulate, **kwargs: MultiPassDefense and CausalLMModule.
    """

    precision_reason = ("it needs fp32 master weights for its finite-difference step and computes gradients "
                        "without a loss scaler (so no fp16 '16-mixed')")

    def __init__(self, alpha: float = 1.0, beta: float = 0.01, eps: float = 1e-3,
                 estimator: str = "finite_difference", use_unlearning: bool = True,
                 lens_mean: Literal["honest", "reference"] = "honest",
                 benign_tokens: Literal["response", "sequence"] = "response",
                 precision: Literal["fp32_master", "reference_bf16"] = "fp32_master", **kwargs):
        super().__init__(**kwargs)
        if precision not in PRECISIONS:
            raise UserError(f"SEAM precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision_mode = precision
        if benign_tokens not in BENIGN_TOKENS:
            raise UserError(f"SEAM benign_tokens must be one of {', '.join(BENIGN_TOKENS)}, got {benign_tokens!r}")
        self.benign_tokens = benign_tokens
        if lens_mean not in LENS_MEANS:
            raise UserError(f"SEAM lens_mean must be one of {', '.join(LENS_MEANS)}, got {lens_mean!r}")
        self.lens_mean = lens_mean
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"SEAM {name} must be a finite number >= 0, got {value}")
        if not (eps > 0 and math.isfinite(eps)):
            raise UserError(f"SEAM eps (finite-difference step) must be > 0, got {eps}")
        if estimator not in ESTIMATORS:
            raise UserError(f"unknown SEAM estimator {estimator!r}; choose from {list(ESTIMATORS)}")
        if alpha == 0 and beta == 0 and not use_unlearning:
            raise UserError("SEAM with alpha=0, beta=0 and use_unlearning=false has no loss term; enable one")
        self.alpha, self.beta, self.eps, self.estimator = float(alpha), float(beta), float(eps), estimator
        self.use_unlearning = use_unlearning
        if estimator == "exact":
            self.model.set_attn_implementation("eager")  # fused SDPA kernels have no double backward

    def needs_exact_params(self) -> bool:
        return self.beta > 0 and self.precision_mode == "fp32_master"

    def on_fit_start(self) -> None:
        if self.precision_mode == "reference_bf16":
            if str(self.trainer.precision) not in ("bf16-true", "32-true") or any(
                    p.dtype != torch.bfloat16 for p in self.trainable_parameters()):
                raise UserError("SEAM precision 'reference_bf16' trains bf16 weights (model.init_args.dtype bfloat16, "
                                f"trainer.precision bf16-true); got trainer.precision {str(self.trainer.precision)!r} "
                                f"and {self.trainable_parameters()[0].dtype} weights")
            rank_zero_warn(REFERENCE_BF16_WARNING)
        else:
            super().on_fit_start()
        if self.estimator == "exact" and (self.trainer.world_size > 1 or any_sharded(self.trainable_parameters())):
            raise UserError("SEAM estimator 'exact' is a single-process check (double backward, no all-reduce); "
                            "use estimator finite_difference under DDP")

    # ----- one step ------------------------------------------------------------------------------
    def step_gradient(self, batch):
        harmful, refusal, benign = require_parts(batch, PARTS, "SEAM")
        benign = supervise(benign, self.benign_tokens)
        params = self.trainable_parameters()
        w_h, w_r, w_b = self.token_weights(harmful, refusal, benign)
        need_sd = self.beta > 0
        logs: dict = {}
        total = None

        def add(grad, scale):
            nonlocal total
            if total is None:
                total = [g.mul_(scale) if scale != 1.0 else g for g in grad]
            else:
                with torch.no_grad():
                    for t, g in zip(total, grad):
                        t.add_(g, alpha=scale)

        # Harmful batch: one forward serves g_a and L_ul (logit lens over all hidden states). g_a's
        # backward goes first and keeps the graph; L_ul's backward then frees all of it. FSDP frees the
        # gathered weights after every backward, so there g_a gets a forward of its own (one forward more).
        g_a = None
        if need_sd and self.use_unlearning and any_sharded(params):
            g_a = grads_of(self.ce(harmful, w_h), params)
            final_ce, hidden_states = response_forward(self.model, harmful, hidden=True)
        else:
            final_ce, hidden_states = response_forward(self.model, harmful, hidden=self.use_unlearning)
            if need_sd:
                g_a = grads_of(final_ce * w_h, params, retain_graph=self.use_unlearning)
        if self.use_unlearning:
            lm_head, norm = lens_modules(self.model)
            lens = logit_lens_ce(hidden_states, harmful["labels"], lm_head, norm, final_ce=final_ce,
                                 mean=self.lens_mean)
            l_ul = self.check_finite(bounded_ascent(global_value(lens * w_h)), "SEAM L_ul")
            grad = grads_of(l_ul, params)
            logs["grad_norm/L_ul"] = global_norm(grad)
            add(grad, 1.0)
            logs["L_ul"] = l_ul.detach()
            del lens, l_ul, grad
        del final_ce, hidden_states

        if self.alpha > 0:
            l_up = self.check_finite(global_value(self.ce(refusal, w_r)), "SEAM L_up")
            grad = grads_of(l_up, params)
            logs["grad_norm/L_up"] = global_norm(grad)
            add(grad, self.alpha)
            logs["L_up"] = l_up.detach()
            del grad

        if need_sd:
            est, logs["cos_ab"], logs["est_norm"] = self._sd_gradient(params, harmful, benign, w_h, w_b, g_a)
            del g_a
            add(est, self.beta)
            del est
            rest = float(logs.get("grad_norm/L_ul", 0.0)) + self.alpha * float(logs.get("grad_norm/L_up", 0.0))
            logs["sd_share"] = self.beta * float(logs["est_norm"]) / rest if rest > 0 else float("nan")

        loss = float(logs.get("L_ul", 0.0)) + self.alpha * float(logs.get("L_up", 0.0))
        logs["loss"] = loss + self.beta * float(logs.get("cos_ab", 0.0))
        return total, logs

    def _sd_gradient(self, params, harmful, benign, w_h: float, w_b: float, g_a):
        """(estimate of grad L_sd, cos(g_a, g_b), estimate norm), all from all-reduced gradients.

        g_a: the local harmful gradient (reduced here in place). The estimator's extra passes run on
        the unwrapped HF model, so DDP's reducer never sees them.
        """
        all_reduce_mean_(g_a)
        g_b = all_reduce_mean_(grads_of(self.ce(benign, w_b), params))
        bf16 = self.precision_mode == "reference_bf16"
        if bf16:
            self.log("train/bf16_unmoved_share", unmoved_share(params, g_a, g_b, self.eps), on_step=True)
        elif self.estimator == "exact":
            cosine = dot(g_a, g_b) / (global_norm(g_a) * global_norm(g_b))
            del g_a, g_b
            est = exact_sd_grad(params, lambda: self.ce(harmful, w_h), lambda: self.ce(benign, w_b))
            return est, cosine, global_norm(est)
        with inexact_weights_allowed() if bf16 else contextlib.nullcontext():
            est, stats = finite_difference_sd_grad(params, lambda: grads_of(self.ce(harmful, w_h), params), None,
                                                   g_a, g_b, self.eps, loss_b_fn=lambda: self.ce(benign, w_b))
        del g_b  # emptied by the estimator after its last use
        return est, stats["cosine"], stats["est_norm"]


@torch.no_grad()
def unmoved_share(params, g_a, g_b, eps: float) -> float:
    """The share of weight elements that the first finite-difference step, eps * (g_b/|g_b| - c g_a/|g_a|), leaves
    unchanged when added in the weights' own dtype (0 in fp32 for a nonzero direction; most of them in bf16)."""
    norm_a, norm_b = float(global_norm(g_a)), float(global_norm(g_b))
    if not (norm_a > 0 and norm_b > 0):
        return float("nan")
    c = float(dot(g_a, g_b)) / (norm_a * norm_b)
    same = total = 0
    for p, a, b in zip(params, g_a, g_b):
        step = (b.float() / norm_b - c * a.float() / norm_a) * eps
        same += int(((p.float() + step).to(p.dtype) == p).sum())
        total += p.numel()
    return same / total
