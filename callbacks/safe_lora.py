"""SafeLoRA: after a LoRA fine-tune, project the LoRA updates that leave the alignment subspace onto it, at fit end.

The method (Hsu et al., "Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning Large Language
Models", NeurIPS 2024; reference code IBM/SafeLoRA model.py and config.py): no data and no training. For every weight
W that the fine-tune's LoRA adapts, V = W_aligned - W_base is what alignment changed, and C = V V^T / ||V||_F
(immunize.lightning_modules.functional.safe_lora). Per module, the cosine between the flattened C B A and B A
measures how much of the LoRA update B A lies in V's directions; the modules with the lowest cosines get
lora_B <- C lora_B (lora_A unchanged):
- select "number" (the reference's default): the num_proj_layers modules with the lowest cosine (10; the threshold is
  the 10th-smallest cosine, so ties can add modules);
- select "threshold": every module whose cosine is <= threshold (0.5).
A "module" is one adapted weight (block 7's v_proj). Cosines are rounded to 5 decimals, as the reference does.

Inputs: `base_model`, the unaligned model the aligned one was trained from (a model directory or hub id; the bench
fills in the model its alignment stage started from). W_aligned defaults to the frozen base weights of the LoRA
fine-tune itself (the fine-tune starts from the aligned model and LoRA leaves those weights unchanged); give
`aligned_model` to read them from another model instead. Base (and aligned) weights are read one tensor at a time
from safetensors files (immunize.lightning_modules.modeling.checkpoint_tensors); each module's C (d_out x d_out,
fp32) is built on the weight's device and freed before the next one, so the extra memory is about one C. Only 2-D
weights are used; a LoRA on anything else (an embedding, a convolution) is left as it is.

Checked at fit start (one-line errors): the fine-tune has LoRA adapters, base_model holds every adapted weight with
the fine-tuned model's shape, and the adapted weights are frozen. Reported at fit end: the number of projected
modules, the threshold used, and the reference's diagnostic, the mean over modules of 1 / (1 + ||B_final - C B||)
(1 when every module is projected; the reference prints "> 0.8 is better"), to the log, to the trainer's loggers
(safe_lora/*) and, per module, to <log dir>/report_file on rank 0.

Distributed (DDP): every rank holds the same weights and computes the same projection. FSDP-sharded models are
refused (the projection needs each whole lora_B; a LoRA fine-tune fits DDP).
"""
from __future__ import annotations

import math
import time
from typing import Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info

from immunize.callbacks.base import FinetuneDefense
from immunize.errors import UserError
from immunize.lightning_modules.functional.safe_lora import (SELECT_MODES, alignment_projector, cosine_threshold,
                                                             distance_score, projected_cosine, selected_modules)
from immunize.lightning_modules.modeling.checkpoint_tensors import CheckpointTensors
from immunize.lightning_modules.modeling.sharding import any_sharded


def lora_modules(model) -> list[tuple[str, object, str]]:
    """(weight name in the Hugging Face model, peft LoRA layer, adapter name) of every active LoRA adapter on a 2-D
    weight, in module order; the weight name is the one a saved checkpoint uses
    (`model.layers.0.self_attn.q_proj.weight`)."""
    from peft.tuners.lora import LoraLayer

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = []
    for name, module in hf.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = getattr(module.get_base_layer(), "weight", None)
        for adapter in module.active_adapters:
            if adapter in module.lora_A and weight is not None and weight.dim() == 2 \
                    and module.lora_B[adapter].weight.dim() == 2:
                out.append((f"{name}.weight", module, adapter))
    return out


def _prefix(model) -> str:
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, "base_model_prefix", "") or ""


class SafeLoRA(FinetuneDefense):
    """SafeLoRA at fit end (see the module docstring).

    Args:
        base_model: the unaligned base model (a model directory or hub id): W_base. Required (the bench sets it to the
            model its alignment stage started from when the config leaves it null).
        aligned_model: where W_aligned is read from (None: the frozen base weights of the fine-tune's LoRA layers,
            i.e. the model the fine-tune started from).
        select: "number" (the num_proj_layers lowest cosines, the reference's default) or "threshold".
        num_proj_layers: how many modules "number" projects (ties at the threshold add more).
        threshold: the cosine at or below which "threshold" projects a module.
        base_gguf_file: the GGUF file inside a base_model directory (that model is then loaded whole).
        report_file: JSON report (per module: cosine, projected, diagnostic) in the log dir (None: none).
    """

    def __init__(self, base_model: Optional[str] = None, aligned_model: Optional[str] = None,
                 select: Literal["number", "threshold"] = "number", num_proj_layers: int = 10, threshold: float = 0.5,
                 base_gguf_file: Optional[str] = None, report_file: Optional[str] = "safe_lora.json"):
        if not base_model:
            raise UserError("SafeLoRA: base_model is required: the unaligned model the aligned one was trained "
                            "from (a model directory or hub id), e.g. "
                            "--trainer.callbacks.init_args.base_model runs/toy/base")
        if select not in SELECT_MODES:
            raise UserError(f"SafeLoRA: select must be one of {', '.join(SELECT_MODES)}, got {select!r}")
        if isinstance(num_proj_layers, bool) or not isinstance(num_proj_layers, int) or num_proj_layers < 1:
            raise UserError(f"SafeLoRA: num_proj_layers must be an integer >= 1, got {num_proj_layers!r}")
        if not math.isfinite(threshold):
            raise UserError(f"SafeLoRA: threshold must be a finite cosine (the reference's 0.5), got {threshold}")
        super().__init__()
        self.base_model, self.aligned_model, self.base_gguf_file = base_model, aligned_model, base_gguf_file
        self.select, self.num_proj_layers, self.threshold = select, num_proj_layers, float(threshold)
        self.report_file = report_file
        self.report: Optional[dict] = None

    # ----- fit start: fail before training -------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):  # the model is sharded after setup
            raise UserError("SafeLoRA: the model is FSDP-sharded; run the LoRA fine-tune with DDP or on one device")
        self.check(pl_module.model, getattr(pl_module, "tokenizer", None))

    def _readers(self, tokenizer) -> tuple[CheckpointTensors, Optional[CheckpointTensors]]:
        base = CheckpointTensors(self.base_model, "SafeLoRA: base_model", self.base_gguf_file, tokenizer)
        aligned = (CheckpointTensors(self.aligned_model, "SafeLoRA: aligned_model", tokenizer=tokenizer)
                   if self.aligned_model else None)
        return base, aligned

    def check(self, model, tokenizer=None) -> tuple[CheckpointTensors, Optional[CheckpointTensors]]:
        """The one-line errors of a fine-tune SafeLoRA cannot act on (no LoRA, sharded, trained base weights, a base
        model without the adapted weights or with other shapes); returns the readers of base and aligned weights."""
        modules = lora_modules(model)
        if not modules:
            raise UserError("SafeLoRA: the fine-tune has no LoRA adapters (SafeLoRA projects LoRA updates); set "
                            "model.init_args.lora, e.g. {r: 8, target_modules: [q_proj, v_proj]}")
        if any_sharded([layer.lora_B[adapter].weight for _, layer, adapter in modules]):
            raise UserError("SafeLoRA: the model is FSDP-sharded; run the LoRA fine-tune with DDP or on one device")
        trained = [name for name, layer, _ in modules if layer.get_base_layer().weight.requires_grad]
        if trained and not self.aligned_model:
            raise UserError(f"SafeLoRA: the weight {trained[0]} trains with its LoRA, so it is not the aligned weight "
                            "any more; freeze it or give aligned_model")
        readers = self._readers(tokenizer)
        prefix = _prefix(model)
        for reader in readers:
            if reader is None:
                continue
            for name, layer, _ in modules:
                stored = reader.find(name, prefix)
                if stored is None:
                    raise UserError(f"{reader.what} {reader.source!r} has no tensor {name}; it must be the same "
                                    "architecture as the fine-tuned model")
                want = tuple(layer.get_base_layer().weight.shape)
                if reader.shape(stored) != want:
                    raise UserError(f"{reader.what} {reader.source!r}: {name} has shape {reader.shape(stored)}, the "
                                    f"fine-tuned model's has {want}; it must be the same architecture")
        return readers

    # ----- fit end ---------------------------------------------------------------------------------
    def apply(self, trainer, pl_module) -> None:
        start = time.perf_counter()
        self.report = self.project(pl_module.model, getattr(pl_module, "tokenizer", None))
        self.report["seconds"] = time.perf_counter() - start
        self.report["global_step"] = trainer.global_step if trainer is not None else 0
        self._save(trainer)

    def project(self, model, tokenizer=None) -> dict:
        """Project the selected modules' lora_B in place; returns the report (without time and step)."""
        base, aligned = self.check(model, tokenizer)
        prefix = _prefix(model)
        modules = lora_modules(model)
        cosines, projected = [], []
        with torch.no_grad():
            for name, layer, adapter in modules:
                weight = layer.get_base_layer().weight
                w_aligned = aligned.get(aligned.find(name, prefix), weight.device) if aligned else weight
                c = alignment_projector(w_aligned, base.get(base.find(name, prefix), weight.device))
                del w_aligned
                lora_b = layer.lora_B[adapter].weight
                cosines.append(projected_cosine(c, lora_b, layer.lora_A[adapter].weight))
                projected.append(c @ lora_b.float())  # d_out x r: small; C itself is freed here
                del c
            threshold = cosine_threshold(cosines, self.select, self.num_proj_layers, self.threshold)
            chosen = selected_modules(cosines, threshold)
            distances = []
            for (name, layer, adapter), new_b, take in zip(modules, projected, chosen):
                lora_b = layer.lora_B[adapter].weight
                if take:
                    lora_b.copy_(new_b.to(lora_b.dtype))
                distances.append(distance_score(lora_b, new_b))
        per_module = {name: {"cosine": cos, "projected": take, "distance": dist}
                      for (name, _, _), cos, take, dist in zip(modules, cosines, chosen, distances)}
        return {"select": self.select, "num_proj_layers": self.num_proj_layers, "threshold": threshold,
                "modules": len(modules), "projected": sum(chosen), "distance": sum(distances) / len(distances),
                "base_model": self.base_model,
                "aligned_model": self.aligned_model or "(the fine-tune's own base weights)",
                "per_module": per_module}

    def _save(self, trainer) -> None:
        r = self.report
        rank_zero_info(f"SafeLoRA: projected {r['projected']} of {r['modules']} LoRA modules (cosine <= "
                       f"{r['threshold']:g}); mean 1/(1+|B - CB|) = {r['distance']:.4f} "
                       "(the reference: > 0.8 is better)")
        if trainer is None:
            return
        metrics = {"safe_lora/projected_modules": float(r["projected"]), "safe_lora/modules": float(r["modules"]),
                   "safe_lora/distance": r["distance"]}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        self.write_report(trainer, self.report_file, r)
