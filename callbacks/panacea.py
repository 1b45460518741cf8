"""Panacea: learn a perturbation eps during a user's fine-tune and add it to the weights at fit end.

Objective (the Panacea paper, Wang et al. 2025, Section 4, Eq. 2-4): max_w lambda * (h(w + eps*) - h(w)) - g(w) with the one-step
eps* = rho * grad h(w) / |grad h(w)|, g the user's task loss and h the loss on harmful
(prompt -> harmful answer) data. Per optimizer step, after the task gradient is in p.grad:

    grad h(w) -> eps -> w += eps -> grad h(w + eps) (h clamped at loss_clamp) -> w restored
    p.grad += -lam * (grad h(w + eps) - grad h(w))

At fit end the last eps is added to the trainable weights once, so `immunize fit --export_dir`
exports the perturbed model, and eps alone is written to log_dir/eps_file (safetensors).

Modes
- "in_training": the above, during the user's fine-tune (the paper's method).
- "post_hoc": no change to training; at fit end eps alone is optimised for post_hoc_steps
  normalised-gradient steps on h(w + eps) - task_weight * g(w + eps) (harmful batches and batches
  of the trainer's train dataloader; h clamped as above), projected to |eps| <= rho, then added.
  Meant for a provider holding an already fine-tuned checkpoint: run `immunize fit` on it with
  `--trainer.max_steps 0` so the weights themselves are not trained (Lightning still calls
  on_fit_end then; the fit loop is skipped).

Distributed (DDP): each rank draws a different harmful batch (batch size harmful_batch_size per
rank, like data.batch_size), and the harmful gradients and losses are all-reduced (mean) before
anything depends on them, so every rank holds the same eps, the same clamp decision and the same
gradient correction: the global harmful batch is world_size * harmful_batch_size, as the task batch.

Where eps lives: on the tensors that train (pl_module.trainable_parameters()): every weight for
full fine-tuning, only the LoRA A/B matrices with LoRA. The eps file holds those tensors under their
parameter names in pl_module.model and, for LoRA, also the change eps makes to each merged weight
under the exported model's parameter names (what immunize.affinity reads); metadata "space" says which.

Resume: eps and the harmful-draw counter are in the callback's state_dict; harmful batches are a pure
function of (seed, draw, rank, world size), so a resumed fit draws what an uninterrupted one would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from immunize.callbacks.base import FinetuneDefense, draw_indices, named_trainable  # noqa: F401 (draw_indices: re-export)
from immunize.datamodules.catalog import Source
from immunize.errors import UserError
from immunize.io import atomic_save_safetensors, atomic_write_json
from immunize.lightning_modules.modeling.sharding import is_sharded
from immunize.lightning_modules.functional.grad_math import EXACT_DTYPES, add_scaled_, all_reduce_mean_, global_norm, grads_of
from immunize.lightning_modules.functional.perturbation import normalized, perturbed

MODES = ("in_training", "post_hoc")
EPS_FORMAT = "immunize.panacea_eps/1"


# ----- plain functions (unit-tested alone) --------------------------------------------------------
def reduced_scalar(value: torch.Tensor) -> float:
    """A loss value averaged over DDP ranks (the value itself when not distributed)."""
    t = value.detach().float().clone().reshape(1)
    all_reduce_mean_([t])
    return float(t)


def panacea_step(harmful_loss: Callable[[], torch.Tensor], params: Sequence[torch.nn.Parameter], rho: float,
                 lam: float, loss_clamp: Optional[float]) -> tuple[list[torch.Tensor], list[torch.Tensor], dict]:
    """One Panacea perturbation on a fixed harmful batch (harmful_loss() evaluates it at the current weights).

    Returns (eps, correction, stats): correction = -lam * (grad h(w + eps) - grad h(w)) is to be added to
    the task gradient. The weights are restored exactly (copied back, not subtracted) before returning.
    grad h(w + eps) is zero when the rank-averaged h(w + eps) exceeds loss_clamp (the reference clamps the
    loss at 5: above it the gradient vanishes); the backward pass is skipped then.
    """
    h0 = harmful_loss()
    h0_mean = h0.detach().float().clone().reshape(1)
    *grad_w, h0_mean = all_reduce_mean_(grads_of(h0, params) + [h0_mean])  # one collective for both
    eps = normalized(grad_w, rho)
    with perturbed(params, eps):
        h1 = harmful_loss()
        h1_mean = reduced_scalar(h1)
        clamped = loss_clamp is not None and h1_mean > loss_clamp
        if clamped:
            grad_pert = [torch.zeros_like(g) for g in grad_w]
        else:
            grad_pert = list(all_reduce_mean_(grads_of(h1, params)))
    for a, b in zip(grad_w, grad_pert):  # in place: correction = -lam * (grad_pert - grad_w), no extra copy
        b.sub_(a).mul_(-lam)
    correction = grad_pert
    stats = {"h": float(h0_mean), "h_perturbed": h1_mean, "clamped": float(clamped)}
    return eps, correction, stats


def project_(eps: Sequence[torch.Tensor], rho: float) -> None:
    """Scale eps in place onto the ball |eps| <= rho (one global norm)."""
    norm = float(global_norm(eps))
    if norm > rho:
        for e in eps:
            e.mul_(rho / norm)


def lora_merged_deltas(model, apply: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Change of each merged LoRA weight caused by `apply()` (which perturbs A/B), keyed by the
    merged model's parameter names ("model.layers.0.self_attn.q_proj.weight"); {} without LoRA."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no LoRA possible
        apply()
        return {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}

    def deltas() -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for name, mod in layers.items():
                d = sum(mod.get_delta_weight(a).float() for a in mod.active_adapters)
                out[name.removeprefix("base_model.model.") + ".weight"] = d.detach().cpu()
        return out

    before = deltas()
    apply()
    return {k: v - before[k] for k, v in deltas().items()}


# ----- the callback -------------------------------------------------------------------------------
class Panacea(FinetuneDefense):
    """Panacea defense during (mode "in_training") or after (mode "post_hoc") a user's fine-tune.

    Wang et al., "Panacea: Mitigating Harmful Fine-tuning for Large Language Models via Post-fine-tuning
    Perturbation" (2025), Section 4 (the objective, Eq. 2-4, and the one-step eps*).

    Args:
        rho: |eps|, the global L2 norm over the trainable tensors (the paper's 1, meant for LoRA factors).
        lam: weight of the harmful-loss gap (the paper's 1e-3).
        harmful: the h dataset (default: toy harmful answers of split "align", disjoint from the attack split a
            HarmfulMix draws its harmful samples from and from the eval split).
        harmful_batch_size: h rows per rank and step (the paper's 10).
        loss_clamp: h(w + eps) above it gives no gradient (the reference clamps at 5; None: no clamp).
        mode: "in_training" (the paper) or "post_hoc" (see the module docstring).
        post_hoc_steps, post_hoc_lr, task_weight: the post-hoc optimisation (steps, step length as a fraction of
            rho, weight of the task loss).
        eps_file: eps is written to this file in the log dir (None: not saved).
        template, max_length: encoding of the harmful samples (None: the datamodule's).
        seed: the harmful draw order.
    """

    def __init__(self, rho: float = 1.0, lam: float = 1e-3, harmful: Optional[Source] = None,
                 harmful_batch_size: int = 10, loss_clamp: Optional[float] = 5.0, mode: str = "in_training",
                 post_hoc_steps: int = 20, post_hoc_lr: float = 0.1, task_weight: float = 1.0,
                 eps_file: Optional[str] = "panacea_eps.safetensors", template: Optional[str] = None,
                 max_length: Optional[int] = None, seed: int = 0):
        if mode not in MODES:
            raise UserError(f"Panacea: unknown mode {mode!r}; choose from {list(MODES)}")
        if not rho > 0:
            raise UserError(f"Panacea: rho must be > 0, got {rho}")
        if lam < 0:
            raise UserError(f"Panacea: lam must be >= 0, got {lam}")
        if harmful_batch_size < 1:
            raise UserError(f"Panacea: harmful_batch_size must be >= 1, got {harmful_batch_size}")
        if post_hoc_steps < 0 or not post_hoc_lr > 0:
            raise UserError(f"Panacea: need post_hoc_steps >= 0 and post_hoc_lr > 0, got {post_hoc_steps}, {post_hoc_lr}")
        super().__init__(harmful or Source(kind="toy", part="harmful", split="align"), "harmful", harmful_batch_size,
                         template, max_length, seed)
        self.rho, self.lam, self.loss_clamp, self.mode = float(rho), float(lam), loss_clamp, mode
        self.post_hoc_steps, self.post_hoc_lr, self.task_weight = post_hoc_steps, float(post_hoc_lr), float(task_weight)
        self.eps_file = eps_file
        self.eps: Optional[dict[str, torch.Tensor]] = None  # name -> eps (fp32), the last one computed
        self.last_stats: dict = {}
        self.eps_path: Optional[Path] = None

    @property
    def harmful(self) -> Source:
        return self.data

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, lam=self.lam, mode=self.mode)

    # ----- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names, params = named_trainable(pl_module, "Panacea")
        bad = [(n, p.dtype) for n, p in zip(names, params) if p.dtype not in EXACT_DTYPES]
        if bad:
            raise UserError(f"Panacea adds eps to the weights and takes it off again every step, which needs fp32 "
                            f"trainable weights; {bad[0][0]} is {bad[0][1]}. Load the model in float32 (or train LoRA: "
                            "peft keeps the adapters in fp32) and use precision bf16-mixed, not bf16-true")
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "harmful", None) == self.harmful:
            rank_zero_warn("Panacea: its harmful set is the same source the fine-tuning mix draws harmful samples from; "
                           "use a disjoint split (toy: split align) so h is not the user's data")
        super().setup(trainer, pl_module, stage)

    def _loss_fn(self, trainer, pl_module, batch) -> Callable[[], torch.Tensor]:
        def loss():
            with self.forward_context(trainer):
                return pl_module.lm_loss(batch)
        return loss

    # ----- in-training mode ----------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.mode != "in_training":
            return
        names, params = named_trainable(pl_module, "Panacea")
        batch = self.next_batch(trainer, params[0].device)
        eps, correction, stats = panacea_step(self._loss_fn(trainer, pl_module, batch), params, self.rho, self.lam,
                                              self.loss_clamp)
        for p, c in zip(params, correction):
            if p.grad is None:
                p.grad = c.to(p.dtype)
            else:
                p.grad.add_(c.to(p.grad.dtype))
        self.eps = dict(zip(names, eps))
        self.last_stats = stats
        pl_module.log_dict({f"panacea/{k}": v for k, v in stats.items()}, on_step=True, on_epoch=False)

    # ----- post-hoc mode -------------------------------------------------------------------------
    def _task_batches(self, trainer):
        loader = trainer.train_dataloader
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.train_dataloader()
        if loader is None:
            raise UserError("Panacea post_hoc: needs task batches; give the fit a datamodule with a train_dataloader")
        while True:
            empty = True
            for batch in loader:
                empty = False
                yield batch
            if empty:
                raise UserError("Panacea post_hoc: the train dataloader is empty")

    def optimize_eps(self, trainer, pl_module) -> list[torch.Tensor]:
        """Post-hoc: eps maximising h(w+eps) - task_weight*g(w+eps) over |eps| <= rho; the weights stay as they are.

        Starts from the closed form rho*grad h/|grad h| and takes normalised gradient steps of length
        post_hoc_lr*rho, each followed by the projection. Gradients are rank-averaged, so eps is identical on all ranks.
        """
        names, params = named_trainable(pl_module, "Panacea")
        device = params[0].device
        first = self.next_batch(trainer, device)
        eps = normalized(all_reduce_mean_(grads_of(self._loss_fn(trainer, pl_module, first)(), params)), self.rho)
        tasks = self._task_batches(trainer)
        history = []
        with perturbed(params) as shift:
            for step in range(self.post_hoc_steps):
                hb = self.next_batch(trainer, device)
                tb = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(tasks).items()}
                shift.add(eps)
                h = self._loss_fn(trainer, pl_module, hb)()
                h_mean = reduced_scalar(h)
                clamped = self.loss_clamp is not None and h_mean > self.loss_clamp
                grad_h = [torch.zeros_like(e) for e in eps] if clamped else grads_of(h, params)
                g = self._loss_fn(trainer, pl_module, tb)()
                grad_g = grads_of(g, params)
                shift.restore()
                ascent = all_reduce_mean_([a - self.task_weight * b for a, b in zip(grad_h, grad_g)])
                with torch.no_grad():
                    for e, a in zip(eps, normalized(ascent, self.post_hoc_lr * self.rho)):
                        e.add_(a)
                project_(eps, self.rho)
                history.append({"step": step, "h": h_mean, "g": reduced_scalar(g), "clamped": clamped,
                                "eps_norm": float(global_norm(eps))})
        self.last_stats = {"post_hoc": history}
        self.eps = dict(zip(names, eps))
        return eps

    # ----- fit end: add eps once, save it --------------------------------------------------------
    def apply(self, trainer, pl_module) -> None:
        if self.mode == "post_hoc":
            if trainer.global_step > 0:
                rank_zero_warn(f"Panacea post_hoc: this fit also trained the weights for {trainer.global_step} steps; "
                               "set trainer.max_steps 0 to only perturb a fine-tuned checkpoint")
            self.optimize_eps(trainer, pl_module)
        if self.eps is None:
            rank_zero_warn("Panacea: no eps was computed (no optimizer step ran); the weights are left unchanged")
            return
        names, params = named_trainable(pl_module, "Panacea")
        missing = [n for n in names if n not in self.eps]
        if missing:
            raise UserError(f"Panacea: the saved eps has no tensor for {missing[0]}; the model changed since it was computed")
        eps = [self.eps[n] for n in names]
        deltas = lora_merged_deltas(pl_module.model, lambda: add_scaled_(params, eps, 1.0))
        self._save(trainer, names, eps, deltas)

    def _save(self, trainer, names, eps, deltas) -> None:
        if self.eps_file is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        self.eps_path = out_dir / self.eps_file
        norm = float(global_norm(eps))  # a full reduction under FSDP: every rank takes part
        eps = [e.full_tensor() if is_sharded(e) else e for e in eps]  # FSDP shards gathered (a collective)
        if not trainer.is_global_zero:
            return
        tensors = {n: e.float() for n, e in zip(names, eps)}
        tensors.update({k: v for k, v in deltas.items() if k not in tensors})
        metadata = {"format": EPS_FORMAT, "space": "lora" if deltas else "full", "mode": self.mode,
                    "rho": str(self.rho), "lam": str(self.lam), "global_step": str(trainer.global_step),
                    "trainable": ",".join(names)}
        atomic_save_safetensors(self.eps_path, tensors, metadata)
        rank_zero_info(f"Panacea: added eps (|eps| = {norm:.4g}) to the weights; saved it to {self.eps_path}")
        if self.mode == "post_hoc":
            atomic_write_json(out_dir / (Path(self.eps_file).stem + "_post_hoc.json"), self.last_stats)

    # ----- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        eps = None if self.eps is None else {n: e.detach().cpu().clone() for n, e in self.eps.items()}
        return {**super().state_dict(), "eps": eps}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.eps = state_dict.get("eps")
