"""Antidote: one-shot pruning of the fine-tuned weights that matter most for harmful answers, at fit end.

The method (Huang et al., Antidote, 2024, Section 4; reference code git-disl/Antidote, utils.find_layers and
prune_wanda_outlier): after fine-tuning, score the fine-tuned weights with the Wanda score |W_ij| * ||X_j||_2, where
X_j is input feature j of that linear over harmful calibration samples (prompt + harmful answer), and zero, in
every output row, the `dense_ratio` fraction of weights with the largest scores. No training.

What this callback does at fit end (run it on an already fine-tuned checkpoint with `--trainer.max_steps 0`):
1. Targets (`target`), per decoder layer (the shallowest nn.ModuleList of blocks that hold linears):
   - "lora": the LoRA matrices of the fine-tune (every nn.Linear whose name contains "lora": lora_A and lora_B),
     left unmerged; base weights are untouched. The reference's choice after a LoRA fine-tune.
   - "qkv": the q/k/v projections. The reference's choice after full fine-tuning.
   - "auto" (default): "lora" for a peft model, else "qkv", as the reference decides.
   - "merged": merge a LoRA into the base first (merge_and_unload, in place) and prune every decoder-layer linear
     (q/k/v/o and the MLP). Not the reference: for a user who receives only a merged model and no adapter.
2. ||X_j||_2: forward hooks on the targets over the calibration batches (eval mode, no grad, the trainer's
   precision context), squared inputs summed over the non-padding tokens (the reference feeds one unpadded
   sequence at a time: the same sums). lora_A sees the projection's input, lora_B sees lora_A's output (before
   the LoRA scaling), as in the reference. With sequential=False (default, the reference: its layer loop never
   applies a mask before the next layer) every score comes from the unpruned model; sequential=True does Wanda's
   layer-by-layer procedure (layer i scored on the model whose layers < i are already pruned).
3. `wanda_mask` per weight: per output row, the reference's count and order (keep the int(in * (1 - dense_ratio))
   lowest scores in a stable ascending sort, zero the rest).
Rows of calibration data: the first n_calibration samples of `harmful` (the reference's 2000), encoded like the
fit's data (the datamodule's template and max_length).

Distributed (DDP): rank r takes calibration rows r, r + world, ...; the per-feature sums of squares are
all-reduced before any mask is taken, and all ranks hold the same weights, so every rank prunes the same
weights. A report (pruned counts per linear and per module type, time) goes to <log dir>/report_file on rank 0.
"""
from __future__ import annotations

import time
from typing import Callable, Literal, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from immunize.callbacks.base import FinetuneDefense
from immunize.datamodules.catalog import Source
from immunize.errors import UserError
from immunize.lightning_modules.functional.grad_math import all_reduce_mean_
from immunize.lightning_modules.modeling.sharding import any_sharded, drop_gathered, local, shard_group, shard_sum


# ----- plain functions (unit-tested alone) --------------------------------------------------------
def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the weights to zero: in each output row of `weight` (out x in), the entries with the
    largest Wanda score |W_ij| * act_norm_j beyond the int(in * (1 - ratio)) lowest of a stable ascending sort
    (the reference's count and tie order: of equal scores, the higher column is zeroed)."""
    if weight.dim() != 2:
        raise ValueError(f"wanda_mask: weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda_mask: act_norm must have shape ({weight.shape[1]},), got {tuple(act_norm.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"wanda_mask: ratio must be in [0, 1], got {ratio}")
    keep = int(weight.shape[1] * (1.0 - ratio))
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if keep == weight.shape[1]:
        return mask
    score = weight.detach().float().abs() * act_norm.to(device=weight.device, dtype=torch.float32)[None, :]
    top = torch.sort(score, dim=1, stable=True).indices[:, keep:]
    return mask.scatter_(1, top, True)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the decoder-layer stack: the shallowest nn.ModuleList whose blocks contain nn.Linear
    (model.layers for Llama-style models; expert lists inside a block are deeper, so never chosen)."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        key = (name.count("."), -len(mod))
        if best is None or key < best[0]:
            best = (key, name, mod)
    if best is None:
        raise UserError("Antidote: found no decoder layers (an nn.ModuleList of blocks with nn.Linear) in the model")
    _, name, mod = best
    return [(f"{name}.{i}", block) for i, block in enumerate(mod)]


TARGETS = ("auto", "lora", "qkv", "merged")
QKV = ("q_proj", "k_proj", "v_proj")


def is_target(name: str, target: str) -> bool:
    """Whether the linear at `name` (relative to its decoder layer) is pruned under `target` ("lora": a LoRA
    matrix, "qkv": a q/k/v projection, "merged": any linear)."""
    if target == "lora":
        return "lora" in name
    if target == "qkv":
        return name.rsplit(".", 1)[-1] in QKV
    return True


def decoder_linears(model: nn.Module, target: str = "merged") -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder layer, its nn.Linear modules that `target` prunes, as (qualified name, module)."""
    return [[(f"{lname}.{n}", m) for n, m in block.named_modules() if isinstance(m, nn.Linear) and is_target(n, target)]
            for lname, block in decoder_layers(model)]


def module_type(name: str) -> str:
    """The kind of a pruned linear, its name inside the decoder layer without the adapter name
    ("self_attn.q_proj.lora_A"), for the report's counts per module type."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            parts = parts[i + 1:]
            break
    if len(parts) > 1 and parts[-2].startswith("lora_"):
        parts = parts[:-1]  # lora_A.default -> lora_A
    return ".".join(parts)


class _StopForward(Exception):
    """Raised by a hook after the last layer a calibration pass needs."""


def _stop(module, inputs, output):
    raise _StopForward


def activation_norms(linears: Sequence[tuple[str, nn.Linear]], batches: Sequence[dict],
                     forward: Callable[[dict], object], stop_after: Optional[nn.Module] = None) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input feature of each linear: sqrt of the sum over the batches' non-padding tokens of x_j^2
    (rank-averaged under DDP: only the ranking matters). The forward pass stops after `stop_after` if given."""
    sq = {n: torch.zeros(lin.in_features, dtype=torch.float32, device=lin.weight.device) for n, lin in linears}
    current: dict = {}

    def hook_for(name):
        def hook(module, inputs, output):
            x, mask = inputs[0].detach(), current.get("mask")
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(device=x.device, dtype=torch.bool)]
            sq[name].add_(x.reshape(-1, x.shape[-1]).float().pow(2).sum(0))
        return hook

    handles = [lin.register_forward_hook(hook_for(n)) for n, lin in linears]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(_stop))
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                try:
                    forward(batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    all_reduce_mean_(list(sq.values()))
    return {n: v.sqrt() for n, v in sq.items()}


def antidote_prune(model: nn.Module, batches: Sequence[dict], dense_ratio: float, sequential: bool = False,
                   forward: Optional[Callable[[dict], object]] = None, target: str = "merged") -> dict[str, int]:
    """Zero the Wanda-top `dense_ratio` of every row of every decoder-layer linear that `target` names, in place;
    returns the number of weights zeroed per linear. `forward(batch)` runs the model (default: model(input_ids,
    attention_mask))."""
    if forward is None:
        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    blocks = [block for _, block in decoder_layers(model)]
    per_layer = decoder_linears(model, target)
    if not any(per_layer):
        raise UserError(f"Antidote: no decoder-layer linear to prune for target {target!r} (lora: a peft LoRA model; "
                        f"qkv: modules named {'/'.join(QKV)}); set the callback's target")
    stages = [[i] for i in range(len(blocks))] if sequential else [list(range(len(blocks)))]
    pruned: dict[str, int] = {}
    for stage in stages:
        targets = [t for i in stage for t in per_layer[i]]
        norms = activation_norms(targets, batches, forward, stop_after=blocks[stage[-1]])
        sharded = any_sharded([lin.weight for _, lin in targets])
        if sharded:
            drop_gathered()  # the stopped forward left FSDP mid-iteration
        with torch.no_grad():
            for name, lin in targets:
                # FSDP shards dim 0, the rows: each rank scores and prunes its whole rows (Wanda is per row)
                weight = local(lin.weight)
                mask = wanda_mask(weight, norms[name], dense_ratio)
                weight.masked_fill_(mask, 0)
                pruned[name] = int(mask.sum())
        if sharded:
            drop_gathered()  # the weights changed
    if sharded:
        counts = torch.tensor(list(pruned.values()), dtype=torch.int64)
        shard_sum(counts, shard_group([lin.weight for _, lin in targets]))
        pruned = dict(zip(pruned, counts.tolist()))
    return pruned


# ----- the callback -------------------------------------------------------------------------------
class Antidote(FinetuneDefense):
    """Antidote at fit end (see the module docstring).

    Huang et al., "Antidote: Post-fine-tuning Safety Alignment for Large Language Models against Harmful
    Fine-tuning" (2024), Section 4 (one-shot pruning of the harmful parameters by the Wanda score).

    Args:
        harmful: calibration data (default: toy harmful answers of split "align", disjoint from the attack split a
            HarmfulMix draws from; Pairs give their harmful answer).
        dense_ratio: fraction of each row to zero (the paper's 0.1).
        target: which weights are scored and pruned: "auto" (the reference: the LoRA matrices of a peft model,
            else the q/k/v projections), "lora", "qkv", or "merged" (merge a LoRA first and prune every
            decoder-layer linear: for a merged model without its adapter; not the reference).
        n_calibration: calibration samples, the first ones of the source (the reference's 2000; None: all).
        batch_size: calibration rows per forward.
        sequential: Wanda's layer-by-layer scoring on the progressively pruned model; False (the reference):
            every layer scored on the unpruned model.
        template, max_length: encoding (None: the datamodule's).
        report_file: JSON report in the log dir (None: none).
    """

    def __init__(self, harmful: Optional[Source] = None, dense_ratio: float = 0.1,
                 target: Literal["auto", "lora", "qkv", "merged"] = "auto", n_calibration: Optional[int] = 2000,
                 batch_size: int = 16, sequential: bool = False, template: Optional[str] = None,
                 max_length: Optional[int] = None, report_file: Optional[str] = "antidote.json"):
        if not 0.0 <= dense_ratio <= 1.0:
            raise UserError(f"Antidote: dense_ratio must be in [0, 1], got {dense_ratio}")
        if target not in TARGETS:
            raise UserError(f"Antidote: target must be one of {', '.join(TARGETS)}, got {target!r}")
        if n_calibration is not None and n_calibration < 1:
            raise UserError(f"Antidote: n_calibration must be >= 1 (or null for all), got {n_calibration}")
        if batch_size < 1:
            raise UserError(f"Antidote: batch_size must be >= 1, got {batch_size}")
        super().__init__(harmful or Source(kind="toy", part="harmful", split="align"), "harmful", batch_size,
                         template, max_length)
        self.dense_ratio, self.target, self.n_calibration = float(dense_ratio), target, n_calibration
        self.sequential, self.report_file = sequential, report_file
        self.report: Optional[dict] = None
        self._n_used = 0

    @property
    def harmful(self) -> Source:
        return self.data

    def calibration_batches(self, trainer, device) -> list[dict]:
        """This rank's share of the first n_calibration harmful samples, encoded and padded, on `device`."""
        rows = self.rows[: self.n_calibration]
        self._n_used = len(rows)
        mine = rows[trainer.global_rank::trainer.world_size]
        return [self.collate(mine[i:i + self.batch_size], device) for i in range(0, len(mine), self.batch_size)]

    def resolved_target(self, model: nn.Module) -> str:
        """The target this model gets: "auto" is "lora" for a peft model, else "qkv"."""
        if self.target != "auto":
            return self.target
        return "lora" if hasattr(model, "merge_and_unload") else "qkv"

    def apply(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        device = trainer.strategy.root_device
        was_training = pl_module.model.training
        target = self.resolved_target(pl_module.model)
        try:
            merged = target == "merged" and hasattr(pl_module.model, "merge_and_unload")
            if merged:
                pl_module.model = pl_module.model.merge_and_unload()
            model = pl_module.model
            model.eval()
            batches = self.calibration_batches(trainer, device)

            def forward(batch):
                with self.forward_context(trainer):
                    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

            pruned = antidote_prune(model, batches, self.dense_ratio, self.sequential, forward, target)
        finally:
            pl_module.model.train(was_training)
        by_type: dict[str, int] = {}
        for name, count in pruned.items():
            by_type[module_type(name)] = by_type.get(module_type(name), 0) + count
        total = sum(lin.weight.numel() for layer in decoder_linears(pl_module.model, target) for _, lin in layer)
        self.report = {"dense_ratio": self.dense_ratio, "target": target, "sequential": self.sequential,
                       "lora_merged": merged, "n_calibration": self._n_used,
                       "pruned_total": sum(pruned.values()), "weights_total": total, "pruned_by_type": by_type,
                       "pruned": pruned, "seconds": time.perf_counter() - start, "global_step": trainer.global_step}
        self._save(trainer)

    def _save(self, trainer) -> None:
        pct = 100.0 * self.report["pruned_total"] / max(1, self.report["weights_total"])
        rank_zero_info(f"Antidote: zeroed {self.report['pruned_total']} weights ({pct:.2f}% of the {self.report['target']} "
                       f"targets) in "
                       f"{self.report['seconds']:.2f} s")
        self.write_report(trainer, self.report_file, self.report)
