"""TAR (tamper-resistant safeguards): train so that the model is still safe AFTER a simulated harmful fine-tune.

Tamirisa et al., "Tamper-Resistant Safeguards for Open-Weight LLMs" (ICLR 2025), Section 4 and Algorithm 1, as its
reference code computes it (rishub-tamirisa/tamper-resistance, modules/training.py tar_training_loop). Per outer
step, from the current weights w:
- the simulated attacker: a fresh optimizer (AdamW, betas 0.9/0.999, eps 1e-8, weight decay 0.01) whose learning
  rate is drawn uniformly from `inner_lrs`, K = `inner_steps` steps of harmful CE, a new adversary batch every step;
- after attack step i (0-based) with (i + 1) % tr_every == 0, the gradient of the tamper-resistance loss L_TR at the
  attacked weights w_{i+1} on ONE held-out ("meta") batch drawn for the outer step, weighted by
  lam_tr * exp(tr_decay * (i - (K - 1))) and summed (first order: the attack is not differentiated through);
- w is restored bit-exactly, and the gradient of the retain loss at w is added:

    g = grad L_retain(w) + sum_{i: (i+1) % tr_every == 0} lam_tr * exp(tr_decay * (i - K + 1)) * grad L_TR(w_{i+1})

L_TR is the knowledge-restriction loss: the negative entropy of the next-token distribution (minimising it keeps the
attacked model's predictions flat, so the attacker's CE cannot fall), here on the harmful answers' positions.
L_retain = CE(benign) + refusal_weight * CE(refusal) + retain_representations * mean over the hidden states
(embeddings, every layer, the final norm) of the mean over real tokens of ||h(w) - h(w_original)||_2 on the
benign batch, w_original the model loaded again from its source (LoRA: the adapters switched off), so a resumed
fit anchors where an unbroken one does.
Adversary and meta batches come from the method's own harmful rows (`harmful`, default the datamodule's pairs),
split once into attack rows and `heldout_fraction` held-out rows; every draw is a pure function of (seed, micro-step,
inner step, rank), so a resumed fit draws what an unbroken one would. docs/fidelity.md lists what differs from
the reference and the options that restore immunize's earlier variant (SGD on one reused batch, L_TR on it, a mean).
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from immunize.datamodules.catalog import Source
from immunize.datamodules.drawn import drawn_batch, encode_source, split_rows
from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import require_parts
from immunize.lightning_modules.functional.grad_math import IGNORE, all_reduce_mean_, global_norm, grads_of, masked_ce
from immunize.lightning_modules.modeling.model_loading import load_model, resolve_source
from immunize.lightning_modules.modeling.sharding import any_sharded, is_fsdp_model, shard_model
from immunize.lightning_modules.multi_pass import MultiPassDefense

Reduce = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]
INNER_OPTIMIZERS = ("adamw", "sgd")


def negative_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over supervised next-token positions (labels[:, 1:] != -100) of sum_v p log p (= -entropy), in fp32."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    neg_entropy = (logp.exp() * logp).sum(-1)
    mask = (labels[:, 1:] != IGNORE).to(neg_entropy.dtype)
    return (neg_entropy * mask).sum() / mask.sum().clamp(min=1)


def representation_distance(hidden: Sequence[torch.Tensor], original: Sequence[torch.Tensor],
                            attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the hidden-state tensors of the mean over real tokens of ||h - h_original||_2 (fp32)."""
    mask = attention_mask.to(torch.float32)
    terms = [((h.float() - o.float()).norm(dim=-1) * mask).sum() / mask.sum().clamp(min=1)
             for h, o in zip(hidden, original)]
    return torch.stack(terms).mean()


def tr_weights(inner_steps: int, tr_every: int, tr_decay: Optional[float]) -> dict[int, float]:
    """{inner step i (0-based) after which L_TR is taken: its weight}: every tr_every-th step (the last step when
    none would be), exp(tr_decay * (i - (K - 1))), or 1 / K when tr_decay is None (the reference's unweighted sum)."""
    steps = [i for i in range(inner_steps) if (i + 1) % tr_every == 0] or [inner_steps - 1]
    return {i: (1.0 / inner_steps if tr_decay is None else math.exp(tr_decay * (i - (inner_steps - 1))))
            for i in steps}


def inner_optimizer(params: Sequence[torch.Tensor], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The simulated attacker's optimizer, fresh for every outer step."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def tar_gradient(params: Sequence[torch.Tensor], harmful_loss: Callable[[int], torch.Tensor],
                 retain_loss: Callable[[], torch.Tensor], tr_loss: Callable[[int], torch.Tensor], inner_steps: int,
                 make_optimizer: Callable[[list], torch.optim.Optimizer], lam_tr: float, tr_every: int,
                 tr_decay: Optional[float] = 0.0625, reduce: Reduce = all_reduce_mean_) -> tuple[list, dict]:
    """The TAR gradient of the module docstring, averaged over ranks, and stats (floats).

    harmful_loss(i) and tr_loss(i) are the losses of inner step i. Every inner step's harmful gradient is reduced
    before the attacker's step, so all ranks attack identically; the retain and L_TR gradients enter the final
    reduce. The attacked weights are restored bit-exactly, and gradients accumulating in p.grad are put back.
    Memory beyond the weights: one weight backup, the attacker's state, the retain gradient and the L_TR sum.
    """
    params = list(params)
    retain = retain_loss()
    total = [g.contiguous() for g in grads_of(retain, params)]  # summed into in place
    stats = {"retain": float(retain.detach())}
    del retain
    weights = tr_weights(inner_steps, tr_every, tr_decay)
    tr_values, harmful_values = [], []
    backup = [p.detach().clone() for p in params]
    kept = [p.grad for p in params]
    attacker = make_optimizer(params)
    try:
        for i in range(inner_steps):
            h = harmful_loss(i)
            harmful_values.append(float(h.detach()))
            for p, g in zip(params, reduce(grads_of(h, params))):
                p.grad = g.to(p.dtype)
            del h
            attacker.step()
            for p in params:
                p.grad = None
            if i in weights:
                tr = tr_loss(i)
                tr_values.append(float(tr.detach()))
                with torch.no_grad():
                    for t, g in zip(total, grads_of(tr, params)):
                        t.add_(g, alpha=lam_tr * weights[i])
                del tr
    finally:
        del attacker
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)
        for p, g in zip(params, kept):
            p.grad = g
    stats.update({"harmful_first": harmful_values[0], "harmful_last": harmful_values[-1],
                  "L_TR": sum(tr_values) / len(tr_values)})
    grads = list(reduce(total))
    stats["grad_norm"] = float(global_norm(grads))
    return grads, stats


class TAR(MultiPassDefense):
    """TAR on triplet batches (see the module docstring): the retain loss on the batch's `benign` and `refusal`
    parts, the simulated attack and L_TR on the method's own harmful rows.

    Args:
        inner_steps: K, steps of the simulated attack per outer step (the reference's 64).
        inner_lrs: the attacker's learning rate, drawn uniformly from these per outer step (the reference's
            biology setting: 2e-6, 2e-5, 4e-5).
        inner_optimizer: "adamw" (the reference: betas 0.9/0.999, eps 1e-8) or "sgd" (immunize's earlier attacker).
        inner_weight_decay: the attacker's weight decay (the reference's 0.01, torch's AdamW default).
        inner_batch: "fresh" (the reference: a new adversary batch every inner step) or "same" (one per outer step).
        inner_batch_size: adversary rows per rank per inner step (None: the datamodule's batch size; the reference
            uses 4 against a retain batch of 8).
        lam_tr: scale of the tamper-resistance gradient (the reference's 4).
        tr_every: take L_TR after every this many inner steps (the reference's 4).
        tr_decay: weight exp(tr_decay * (i - K + 1)) of the L_TR gradient after inner step i (the reference's
            0.0625); None: 1 / K each (the reference without its weighting schedule).
        heldout_fraction: share of the harmful rows held out for L_TR's meta batches (the reference's 20%); 0: L_TR on
            the adversary batch of its inner step (immunize's earlier variant).
        harmful: the adversary's rows (None: the harmful answers of the datamodule's pairs).
        retain_representations: weight of the representation-matching term of the retain loss (the reference's 1;
            0: none, and no copy of the original model is kept).
        refusal_weight: weight of the refusal CE in the retain loss (0: benign CE only, as the reference's retain
            set; the harmful-request setting keeps refusals).
        seed: the learning-rate draws, the row split and the batch draws.
        grad_clip, accumulate, **kwargs: MultiPassDefense and CausalLMModule.
    """

    precision_reason = "its inner attack moves fp32 master weights and it computes gradients without a loss scaler"

    def __init__(self, inner_steps: int = 64, inner_lrs: Sequence[float] = (2e-6, 2e-5, 4e-5),
                 inner_optimizer: Literal["adamw", "sgd"] = "adamw", inner_weight_decay: float = 0.01,
                 inner_batch: Literal["fresh", "same"] = "fresh", inner_batch_size: Optional[int] = None,
                 lam_tr: float = 4.0, tr_every: int = 4, tr_decay: Optional[float] = 0.0625,
                 heldout_fraction: float = 0.2, harmful: Optional[Source] = None, retain_representations: float = 1.0,
                 refusal_weight: float = 1.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise UserError(f"TAR inner_steps must be an integer >= 1, got {inner_steps}")
        inner_lrs = [float(v) for v in (inner_lrs if isinstance(inner_lrs, (list, tuple)) else [inner_lrs])]
        if not inner_lrs or not all(v > 0 and math.isfinite(v) for v in inner_lrs):
            raise UserError(f"TAR inner_lrs must be a non-empty list of positive numbers, got {inner_lrs}")
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise UserError(f"TAR inner_optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got {inner_optimizer!r}")
        if inner_batch not in ("fresh", "same"):
            raise UserError(f"TAR inner_batch must be fresh or same, got {inner_batch!r}")
        for name, value in (("lam_tr", lam_tr), ("refusal_weight", refusal_weight), ("inner_weight_decay", inner_weight_decay),
                            ("retain_representations", retain_representations)):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"TAR {name} must be a finite number >= 0, got {value}")
        if int(tr_every) != tr_every or tr_every < 1:
            raise UserError(f"TAR tr_every must be an integer >= 1, got {tr_every}")
        if tr_decay is not None and not math.isfinite(tr_decay):
            raise UserError(f"TAR tr_decay must be a finite number or null, got {tr_decay}")
        if not 0.0 <= heldout_fraction < 1.0:
            raise UserError(f"TAR heldout_fraction must be in [0, 1), got {heldout_fraction}")
        if inner_batch_size is not None and (int(inner_batch_size) != inner_batch_size or inner_batch_size < 1):
            raise UserError(f"TAR inner_batch_size must be an integer >= 1 or null, got {inner_batch_size}")
        self.inner_steps, self.inner_lrs, self.inner_optimizer = int(inner_steps), inner_lrs, inner_optimizer
        self.inner_weight_decay, self.inner_batch, self.inner_batch_size = float(inner_weight_decay), inner_batch, inner_batch_size
        self.lam_tr, self.tr_every, self.tr_decay = float(lam_tr), int(tr_every), tr_decay
        self.heldout_fraction, self.harmful_source = float(heldout_fraction), harmful
        self.retain_representations, self.refusal_weight, self.seed = float(retain_representations), float(refusal_weight), int(seed)
        self.attack_rows: list[dict] = []
        self.meta_rows: list[dict] = []
        self._original = None
        self._pad_id, self._rows_per_batch = 0, 1

    # ----- data of the simulated attack ------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = getattr(self.trainer, "datamodule", None)
        source = self.harmful_source or getattr(dm, "pairs_source", None)
        if source is None:
            raise UserError("TAR needs harmful rows for its simulated attack: set model.init_args.harmful (a Source) or "
                            "use immunize.datamodules.AlignmentData")
        rows = encode_source(source, "harmful", self.tokenizer, getattr(dm, "template", "qa"),
                             getattr(dm, "max_length", 256))
        if self.heldout_fraction > 0 and len(rows) < 2:
            raise UserError(f"TAR: {len(rows)} harmful row(s) cannot be split into attack and held-out rows; give more "
                            f"rows or set heldout_fraction 0")
        self.attack_rows, self.meta_rows = split_rows(rows, self.heldout_fraction, self.seed)
        self._pad_id = self.tokenizer.pad_token_id
        self._rows_per_batch = self.inner_batch_size or getattr(dm, "batch_size", None) or 1

    def micro_step(self) -> int:
        """Micro-batches trained so far in this fit (restored on resume): the draws' clock."""
        return int(self.trainer.fit_loop.total_batch_idx) if self._trainer is not None else 0

    def draw(self, rows: list[dict], draw: int) -> dict:
        trainer = self.trainer
        return drawn_batch(rows, self._rows_per_batch, draw, trainer.global_rank, trainer.world_size, self.seed,
                           self._pad_id, self.device)

    def inner_lr(self, micro_step: int) -> float:
        """The attacker's learning rate of this outer step: a uniform draw from inner_lrs (same on every rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
        return self.inner_lrs[int(torch.randint(len(self.inner_lrs), (1,), generator=g))]

    # ----- the retain loss's anchor ---------------------------------------------------------------
    def needs_anchor(self) -> bool:
        """Whether the retain loss needs a frozen copy of the original model (a LoRA model switches its adapters off
        instead)."""
        return self.retain_representations > 0 and not hasattr(self.model, "disable_adapter") and self._original is None

    def keep_anchor(self, model) -> None:
        # kept outside the module tree: not a submodule, so not in state_dict, checkpoints or the optimizer
        object.__setattr__(self, "_original", model)

    def load_original(self) -> torch.nn.Module:
        """The original model loaded again from the module's source, frozen, in the trainable weights' dtype (the
        reference loads its retain model from disk too): a resumed fit anchors to the same weights as an unbroken one."""
        hp = self.hparams
        model = load_model(resolve_source(hp.model), self.tokenizer, hp.gguf_file, hp.dtype, hp.trust_remote_code,
                           hp.init_seed)
        dtype = next(p for p in self.model.parameters()).dtype
        return model.to(device=next(self.model.parameters()).device, dtype=dtype).eval().requires_grad_(False)

    def configure_model(self) -> None:
        """Under FSDP2 the original model is loaded before sharding and sharded like the model."""
        unsharded = not is_fsdp_model(self.model)
        anchor = self.load_original() if self.device_mesh is not None and unsharded and self.needs_anchor() else None
        super().configure_model()
        if anchor is not None:
            names = self.device_mesh.mesh_dim_names or ()
            shard_model(anchor, self.device_mesh["data_parallel"] if "data_parallel" in names else self.device_mesh)
            self.keep_anchor(anchor)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.needs_anchor():
            if any_sharded(self.trainable_parameters()):
                raise UserError("TAR: the model was sharded before its original could be loaded; set "
                                "model.init_args.retain_representations 0")
            self.keep_anchor(self.load_original())

    def on_fit_end(self) -> None:
        self.keep_anchor(None)

    def original_hidden(self, part: dict) -> list[torch.Tensor]:
        """The hidden states of the model as it was at fit start (no gradient)."""
        with torch.no_grad():
            if self._original is not None:
                out = self._original(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                                     output_hidden_states=True, use_cache=False)
            else:
                with self.model.disable_adapter():
                    out = self.run(part, hidden=True)
        return list(out.hidden_states)

    # ----- the step ----------------------------------------------------------------------------------
    def step_gradient(self, batch):
        _, refusal, benign = require_parts(batch, ("harmful", "refusal", "benign"), "TAR")
        params = self.trainable_parameters()
        w_r, w_b = self.token_weights(refusal, benign)
        step = self.micro_step()
        k = self.inner_steps
        adversary = [self.draw(self.attack_rows, step * k + (i if self.inner_batch == "fresh" else 0))
                     for i in range(k)]
        weights = [self.token_weights(b)[0] for b in adversary]
        meta = self.draw(self.meta_rows, step) if self.meta_rows else None
        w_meta = self.token_weights(meta)[0] if meta is not None else None
        original = self.original_hidden(benign) if self.retain_representations > 0 else None

        def retain_loss():
            if original is None:
                loss = self.ce(benign, w_b)
            else:
                out = self.run(benign, hidden=True)
                loss = (masked_ce(out.logits, benign["labels"]) * w_b
                        + self.retain_representations * representation_distance(out.hidden_states, original,
                                                                                benign["attention_mask"]) * w_b)
            if self.refusal_weight > 0:
                loss = loss + self.refusal_weight * self.ce(refusal, w_r)
            return self.check_finite(loss, "TAR retain loss")

        def tr_loss(i):
            part, w = (meta, w_meta) if meta is not None else (adversary[i], weights[i])
            return negative_entropy(self.run(part).logits, part["labels"]) * w

        lr = self.inner_lr(step)
        grads, stats = tar_gradient(params, lambda i: self.ce(adversary[i], weights[i]), retain_loss, tr_loss, k,
                                    lambda ps: inner_optimizer(ps, self.inner_optimizer, lr, self.inner_weight_decay),
                                    self.lam_tr, self.tr_every, self.tr_decay)
        logs = {"L_retain": stats["retain"], "L_TR": stats["L_TR"], "inner_harmful_first": stats["harmful_first"],
                "inner_harmful_last": stats["harmful_last"], "inner_lr": lr, "grad_norm/step": stats["grad_norm"]}
        logs["loss"] = stats["retain"] + self.lam_tr * stats["L_TR"]
        return grads, logs
