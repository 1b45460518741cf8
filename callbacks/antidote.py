"""Antidote: one-shot pruning of the fine-tuned model's most harmful weights, at fit end.

The method (Huang et al., Antidote, 2024, Section 4): after fine-tuning, score every weight of the model's linear layers with
the Wanda score |W_ij| * ||X_j||_2, where X_j is input feature j of that layer collected over harmful
calibration samples (prompt + harmful answer), and zero, in every output row, the `dense_ratio` fraction of
weights with the largest scores: the weights that matter most when the model produces harmful content.
No training.

What this callback does at fit end (the weights the user's fine-tune produced; run it on an already
fine-tuned checkpoint with `--trainer.max_steps 0`, which skips training but still ends the fit):
1. LoRA: a peft model is merged first (merge_and_unload, in place: pl_module.model becomes the plain merged
   model), so the merged weights are scored and pruned, and the export has no adapters.
2. Targets: every nn.Linear inside the decoder-layer stack (the shallowest nn.ModuleList of blocks that
   hold linears, e.g. model.layers of a Llama: q/k/v/o and gate/up/down); embeddings and lm_head stay.
3. ||X_j||_2: forward hooks on the targets over the calibration batches (eval mode, no grad, the
   trainer's precision context), squared inputs summed over the non-padding tokens. With sequential
   (default) the layers are done in order as in Wanda's reference procedure: layer i is scored on
   activations of the model whose layers < i are already pruned (each pass stops after layer i);
   sequential=False scores all layers in one pass on the unpruned model.
4. `wanda_mask` per weight: per output row the floor(in_features * dense_ratio) largest scores are set to 0.
Rows of calibration data: the first n_calibration samples of `harmful`, encoded like the fit's data
(the datamodule's template and max_length).

Distributed (DDP): rank r takes calibration rows r, r + world, ...; the per-feature sums of squares are
all-reduced before any mask is taken, and all ranks hold the same weights, so every rank prunes the same
weights. A report (pruned counts per layer, time) goes to <log dir>/report_file on rank 0.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from immunize.callbacks.base import FinetuneDefense
from immunize.datamodules.catalog import Source
from immunize.errors import UserError
from immunize.io import atomic_write_json
from immunize.lightning_modules.functional.grad_math import all_reduce_mean_
from immunize.lightning_modules.modeling.sharding import any_sharded, drop_gathered, local, shard_group, shard_sum


# ----- plain functions (unit-tested alone) --------------------------------------------------------
def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the weights to zero: in each output row of `weight` (out x in), the
    floor(in * ratio) entries with the largest Wanda score |W_ij| * act_norm_j (ties: lower column first)."""
    if weight.dim() != 2:
        raise ValueError(f"wanda_mask: weight must be 2-D (out x in), got shape {tuple(weight.shape)}")
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda_mask: act_norm must have shape ({weight.shape[1]},), got {tuple(act_norm.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"wanda_mask: ratio must be in [0, 1], got {ratio}")
    k = math.floor(weight.shape[1] * ratio + 1e-9)  # 10 * 0.7 is 7.000000000000001 in floats: still 7
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    if k == 0:
        return mask
    score = weight.detach().float().abs() * act_norm.to(device=weight.device, dtype=torch.float32)[None, :]
    top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
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


def decoder_linears(model: nn.Module) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder layer, its nn.Linear modules as (qualified name, module)."""
    return [[(f"{lname}.{n}", m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
            for lname, block in decoder_layers(model)]


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


def antidote_prune(model: nn.Module, batches: Sequence[dict], dense_ratio: float, sequential: bool = True,
                   forward: Optional[Callable[[dict], object]] = None) -> dict[str, int]:
    """Zero the Wanda-top `dense_ratio` of every row of every decoder-layer linear, in place; returns the number of
    weights zeroed per linear. `forward(batch)` runs the model (default: model(input_ids, attention_mask))."""
    if forward is None:
        def forward(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    blocks = [block for _, block in decoder_layers(model)]
    per_layer = decoder_linears(model)
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
        n_calibration: calibration samples, the first ones of the source (None: all).
        batch_size: calibration rows per forward.
        sequential: layer-by-layer scoring (Wanda's procedure) or one pass.
        template, max_length: encoding (None: the datamodule's).
        report_file: JSON report in the log dir (None: none).
    """

    def __init__(self, harmful: Optional[Source] = None, dense_ratio: float = 0.1, n_calibration: Optional[int] = 64,
                 batch_size: int = 16, sequential: bool = True, template: Optional[str] = None,
                 max_length: Optional[int] = None, report_file: Optional[str] = "antidote.json"):
        if not 0.0 <= dense_ratio <= 1.0:
            raise UserError(f"Antidote: dense_ratio must be in [0, 1], got {dense_ratio}")
        if n_calibration is not None and n_calibration < 1:
            raise UserError(f"Antidote: n_calibration must be >= 1 (or null for all), got {n_calibration}")
        if batch_size < 1:
            raise UserError(f"Antidote: batch_size must be >= 1, got {batch_size}")
        super().__init__(harmful or Source(kind="toy", part="harmful", split="align"), "harmful", batch_size,
                         template, max_length)
        self.dense_ratio, self.n_calibration = float(dense_ratio), n_calibration
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

    def apply(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        device = trainer.strategy.root_device
        was_training = pl_module.model.training
        try:
            merged = hasattr(pl_module.model, "merge_and_unload")
            if merged:
                pl_module.model = pl_module.model.merge_and_unload()
            model = pl_module.model
            model.eval()
            batches = self.calibration_batches(trainer, device)

            def forward(batch):
                with self.forward_context(trainer):
                    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

            pruned = antidote_prune(model, batches, self.dense_ratio, self.sequential, forward)
        finally:
            pl_module.model.train(was_training)
        total = sum(lin.weight.numel() for layer in decoder_linears(pl_module.model) for _, lin in layer)
        self.report = {"dense_ratio": self.dense_ratio, "sequential": self.sequential, "lora_merged": merged,
                       "n_calibration": self._n_used,
                       "pruned_total": sum(pruned.values()), "weights_total": total, "pruned": pruned,
                       "seconds": time.perf_counter() - start, "global_step": trainer.global_step}
        self._save(trainer)

    def _save(self, trainer) -> None:
        pct = 100.0 * self.report["pruned_total"] / max(1, self.report["weights_total"])
        rank_zero_info(f"Antidote: zeroed {self.report['pruned_total']} decoder-layer weights ({pct:.2f}%) in "
                       f"{self.report['seconds']:.2f} s")
        if self.report_file is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective: all ranks
        if trainer.is_global_zero:
            atomic_write_json(out_dir / self.report_file, self.report)
