"""CausalLMModule: model loading, masked LM loss, optimizer/schedule, generation-based testing, export.

Every method in this project subclasses it, so loading, evaluation and export behave the same everywhere.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.distributed as dist

from immunize.errors import UserError
from immunize.io import atomic_write_json, atomic_write_jsonl
from immunize.outputs import prepare_staging, replace_dir
from immunize.datamodules.records import OVER_REFUSAL
from immunize.judges import is_refusal, make_judge
from immunize.metrics import HarmfulScore, KeyedMean, TaskAccuracy, match_answer
from immunize.statistics import chance_level
from immunize.lightning_modules.evaluation.diagnostics import gradient_cosine, round_robin_tasks
from immunize.lightning_modules.evaluation.generation import greedy_generate
from immunize.lightning_modules.modeling.lora import ADAPTER_DIR, apply_lora, attach_saved_adapter, lora_config, saved_adapter
from immunize.lightning_modules.functional.grad_math import global_norm, sequence_ce
from immunize.lightning_modules.modeling.export_weights import (resolve_dtype, supported, weight_entries, write_config,
                                                                 write_weights)
from immunize.lightning_modules.modeling.model_loading import load_model, load_tokenizer, resolve_source
from immunize.lightning_modules.modeling.optim import build_optimizer, build_scheduler, check_training_args
from immunize.lightning_modules.modeling.sharding import drop_gathered, full_state_dict, is_fsdp_model, shard_model
from immunize.lightning_modules.functional.supervised_ce import response_ce


def check_module_args(max_new_tokens: int = 48, diagnostic_items: int = 64, **training) -> None:
    """The module's counts and its optimizer/schedule values (immunize.lightning_modules.modeling.optim.check_training_args) in range,
    or a one-line UserError: called by the constructor and by `immunize bench` before any work."""
    check_training_args(**training)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"model.max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(diagnostic_items, bool) or not isinstance(diagnostic_items, int) or diagnostic_items < 0:
        raise UserError(f"model.diagnostic_items must be an integer >= 0 (0: not measured), got {diagnostic_items!r}")


class CausalLMModule(L.LightningModule):
    """A Hugging Face causal LM (hub id, local dir, GGUF file in a dir, or toy:<preset>) with optional LoRA.

    Args:
        model: hub id, local model directory, directory holding a GGUF file, or toy:<preset> (tiny, small, base).
        gguf_file: the GGUF file's name inside `model` (transformers dequantises it to `dtype`).
        dtype: weight dtype: float32 (fp32 master weights; use with bf16-mixed), bfloat16 or float16.
        trust_remote_code: allow model code from the hub (off unless you set it).
        lora: train LoRA adapters (peft) instead of all weights: any of peft's LoraConfig fields ({r: 16,
            lora_alpha: 32, target_modules: all-linear, use_dora: true}; see modeling.lora for the defaults).
        optimizer: adamw or sgd.
        lr: learning rate.
        weight_decay, betas, momentum: the optimizer's settings (betas for adamw, momentum for sgd).
        scheduler: constant, cosine or linear decay, after a linear warmup from 0 over ceil(warmup_ratio * steps)
            steps, as transformers.get_scheduler computes them (constant: its constant_with_warmup).
        warmup_ratio: fraction of the optimizer steps spent in linear warmup.
        judge: harmfulness judge of `immunize test`: oracle, keyword, classifier, moderation, strongreject,
            strongreject_classifier, chat_moderator, llm, a preset of a published judge (deberta_harmful_qa,
            beaver_dam, llama_guard_3, strongreject_finetuned, wildguard, qwen3guard), or {name: ..., ...} with its
            arguments (immunize.judges). A judge model runs on this module's device, in bfloat16 when the trainer
            runs bf16, unless the spec sets device or dtype.
        max_new_tokens: greedy generation length of `immunize test`.
        init_seed: seed of a toy preset's random initialisation.
        diagnostic_items: held-out harmful and benign items for the gradient-cosine diagnostic of `immunize test`
            (0: not measured).
        lm_eval: capability through lm-evaluation-harness at the end of `immunize test` (the `eval` extra):
            {tasks: [toy_mc], num_fewshot: 0, limit: null, include_path: null, batch_size: 16}; its metrics join
            metrics.json as lm_eval/<task>/<metric> (percent) and capability/lm_eval (their mean acc), its
            per-sample records go to lm_eval_samples.jsonl. Unknown keys or task names fail here, before any run.
        export_lora: how a LoRA model is exported: "merged" (the adapter folded into the weights) or "adapter" (the
            base weights unmerged, the adapter in the export's `adapter/` folder), so a later stage can continue it.
        adapter: for a model directory exported with export_lora "adapter": "merge" (fold the adapter into the
            weights at load: the model the exporting stage trained) or "continue" (train that adapter further, only
            its weights, as Panacea's reference continues the alignment LoRA; `lora` must then be null).
        export_dtype: dtype of the exported weights (config.json's dtype says it): float32, bfloat16 or float16;
            null: bfloat16 when the trainer ran bf16-mixed or bf16-true, else the weights' own dtype.
    """

    def __init__(
        self,
        model: str = "toy:small",
        gguf_file: Optional[str] = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        lora: Optional[dict] = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.0,
        scheduler: Literal["constant", "cosine", "linear"] = "constant",
        warmup_ratio: float = 0.0,
        judge: Union[str, dict] = "oracle",
        max_new_tokens: int = 48,
        init_seed: int = 0,
        diagnostic_items: int = 64,
        lm_eval: Optional[dict] = None,
        export_lora: Literal["merged", "adapter"] = "merged",
        adapter: Literal["merge", "continue"] = "merge",
        export_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    ):
        super().__init__()
        check_module_args(optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=betas, momentum=momentum,
                          scheduler=scheduler, warmup_ratio=warmup_ratio, max_new_tokens=max_new_tokens,
                          diagnostic_items=diagnostic_items)
        self.save_hyperparameters()
        lora = lora_config(lora)
        if lora is not None:  # the complete settings, as plain data (a checkpoint loads with weights_only=True)
            self.hparams["lora"] = lora
        from immunize.lightning_modules.evaluation.lm_eval_bridge import check_lm_eval_spec, resolve_tasks

        self.lm_eval_spec = check_lm_eval_spec(lm_eval)
        if self.lm_eval_spec is not None:  # unknown task names end the command now, not after the generations
            resolve_tasks(self.lm_eval_spec["tasks"], self.lm_eval_spec["include_path"])
        source = resolve_source(model)
        self.tokenizer = load_tokenizer(source, gguf_file, trust_remote_code)
        self.model = load_model(source, self.tokenizer, gguf_file, dtype, trust_remote_code, init_seed)
        self.lora_spec = lora
        self.export_lora = export_lora
        resolve_dtype(export_dtype, None, self.model)  # a bad name fails now, not after training
        self.export_dtype = export_dtype
        adapter_dir = saved_adapter(source) if not source.startswith("toy:") else None
        if adapter == "continue" and (adapter_dir is None or lora is not None):
            raise UserError(f"model.adapter 'continue' trains the LoRA adapter saved in {source!r}/{ADAPTER_DIR} "
                            "(an export with export_lora: adapter) and needs model.lora null; "
                            + ("set lora to null" if adapter_dir is not None else "that model has no saved adapter"))
        if adapter_dir is not None:
            self.model, continued = attach_saved_adapter(self.model, adapter_dir, trainable=adapter == "continue")
            if continued is not None:
                self.lora_spec = continued
                self.hparams["lora_continued"] = continued
        if lora is not None:
            self.model = apply_lora(self.model, lora)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        self.judge_spec = judge
        self._judge = None
        self.test_results: dict = {}
        self._sharded_params: Optional[list] = None
        self._export_copy = None

    # ----- training ----------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable weights (under FSDP2 their sharded DTensors, fixed at sharding time: between a forward
        and its backward the root unit's modules hold gathered copies instead)."""
        if self._sharded_params is not None:
            return list(self._sharded_params)
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_model(self) -> None:
        """Under Lightning's ModelParallelStrategy, shard the model with FSDP2 over the data-parallel ranks
        (immunize.lightning_modules.modeling.sharding); under every other strategy, nothing."""
        mesh = self.device_mesh
        if mesh is None or is_fsdp_model(self.model):
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise UserError(f"FSDP here shards over data-parallel ranks only, but the strategy's tensor_parallel_size "
                            f"is {mesh['tensor_parallel'].size()}; use trainer.strategy immunize.strategies.FSDP2 "
                            "(configs/trainer/cpu_fsdp.yaml), or set data_parallel_size to the number of devices "
                            "and tensor_parallel_size: 1")
        shard_model(self.model, mesh["data_parallel"] if "data_parallel" in names else mesh)
        self._sharded_params = [p for p in self.model.parameters() if p.requires_grad]

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Under FSDP2: drop any weights still gathered by a forward that had no backward (the optimizer has
        changed the weights since; immunize.lightning_modules.modeling.sharding.drop_gathered)."""
        if is_fsdp_model(self.model):
            drop_gathered()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def lm_loss(self, batch: dict) -> torch.Tensor:
        """Cross-entropy on the response tokens of a right-padded batch."""
        return response_ce(self.model, batch)

    def check_finite(self, loss: torch.Tensor, name: str = "loss") -> torch.Tensor:
        if not torch.isfinite(loss).all():
            raise UserError(f"{name} is {loss.item()} at step {self.global_step}; lower model.lr or check the data for empty responses")
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the global norm of the gradient the optimizer is about to apply (after DDP's reduce)."""
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", global_norm(grads), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_optimizer(self.trainable_parameters(), hp.optimizer, hp.lr, hp.weight_decay, hp.betas, hp.momentum)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = build_scheduler(opt, hp.scheduler, total, hp.warmup_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.lm_loss(batch), prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])

    # ----- evaluation --------------------------------------------------------------------------
    @property
    def judge(self):
        """The judge of `immunize test`, built on first use from model.judge, on this module's device and dtype
        unless its spec sets them (judge_placement)."""
        if self._judge is None:
            self._judge = make_judge(self.judge_spec, defaults=self.judge_placement())
        return self._judge

    def judge_placement(self) -> dict:
        """{"device", "dtype"} for a judge model that does not set them: this module's device (the evaluated model's
        GPU, not the CPU beside it), bfloat16 when the trainer runs bf16 (bf16-mixed or bf16-true), float32
        otherwise (and without a trainer)."""
        trainer = self._trainer
        precision = str(getattr(trainer, "precision", "32-true")) if trainer is not None else "32-true"
        return {"device": str(self.device), "dtype": "bfloat16" if precision.startswith("bf16") else "float32"}

    def generate(self, input_ids, attention_mask, max_new_tokens: Optional[int] = None) -> list[str]:
        return greedy_generate(self.model, self.tokenizer, input_ids, attention_mask, max_new_tokens or self.hparams.max_new_tokens)

    def on_test_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "eval_spec"):
            raise UserError("immunize test needs an evaluation datamodule (immunize.datamodules.EvalData); set data.class_path")
        categories, tasks = datamodule.eval_spec()
        if hasattr(self.judge, "load"):  # the Judge protocol's optional hook: a bad judge model fails before generating
            self.judge.load()
            if getattr(self.judge, "device", None) is not None and self.trainer.is_global_zero:
                print(f"immunize test: judge {type(self.judge).__name__} on {self.judge.device} ({self.judge.dtype})",
                      file=sys.stderr, flush=True)
        self.harmful_metric = HarmfulScore(categories or ["unknown"]).to(self.device)
        self.task_metric = TaskAccuracy(tasks).to(self.device)
        self.loss_metric = KeyedMean(["harmful", *tasks], "loss/").to(self.device)
        self.refusal_metric = KeyedMean(["harmful", OVER_REFUSAL], "refusal/").to(self.device)  # % refused
        self._generations = []

    def gold_losses(self, batch) -> dict[int, float]:
        """{item index: teacher-forced response CE of its gold response} for the batch's items that have one."""
        if "gold" not in batch:
            return {}
        gold = batch["gold"]
        logits = self.model(input_ids=gold["input_ids"], attention_mask=gold["attention_mask"], use_cache=False).logits
        return dict(zip(batch["gold_index"], sequence_ce(logits, gold["labels"]).tolist()))

    def test_step(self, batch, batch_idx):
        items = batch["items"]
        answers = self.generate(batch["input_ids"], batch["attention_mask"])
        losses = self.gold_losses(batch)
        if losses:
            self.loss_metric.update(["harmful" if items[i].kind == "harmful" else items[i].kind for i in losses],
                                    list(losses.values()))
        harmful = [i for i, it in enumerate(items) if it.kind == "harmful"]
        scores, judge_outputs = {}, {}
        if harmful:
            values = self.judge.score([items[i].prompt for i in harmful], [answers[i] for i in harmful])
            scores = dict(zip(harmful, values))
            # a language-model judge keeps what it wrote (immunize.judges.language_models), for auditing its scores
            judge_outputs = dict(zip(harmful, [o.get("output") for o in getattr(self.judge, "last_outputs", [])]))
            self.harmful_metric.update(torch.tensor(values, dtype=torch.float32), [items[i].category or "unknown" for i in harmful])
        refusals = {i: is_refusal(answers[i]) for i, it in enumerate(items) if it.kind in ("harmful", OVER_REFUSAL)}
        if refusals:
            self.refusal_metric.update([items[i].kind for i in refusals], [100.0 * r for r in refusals.values()])
        benign = [i for i, it in enumerate(items) if it.kind not in ("harmful", OVER_REFUSAL)]
        if benign:
            self.task_metric.update([items[i].kind for i in benign], [answers[i] for i in benign], [items[i].reference for i in benign])
        for i, (it, ans) in enumerate(zip(items, answers)):
            row = {"prompt": it.prompt, "kind": it.kind, "category": it.category, "group": it.group,
                   "reference": it.reference, "answer": ans}
            if i in scores:  # NaN (the judge's answer could not be parsed) is written as null
                row["judge_score"] = None if math.isnan(scores[i]) else scores[i]
                if judge_outputs.get(i) is not None:
                    row["judge_output"] = judge_outputs[i]
            elif it.kind != OVER_REFUSAL:
                row["correct"] = bool(match_answer(self.task_metric.tasks[it.kind], ans, it.reference))
            if i in losses:
                row["loss"] = losses[i]
            if i in refusals:
                row["refused"] = refusals[i]
            self._generations.append(row)

    def test_diagnostics(self) -> dict[str, float]:
        """Mechanism diagnostics on held-out items (gold responses): cos(harmful gradient, benign gradient),
        SEAM's L_sd measured after the fact. Every rank computes the same numbers on the same items."""
        datamodule = self.trainer.datamodule
        n = int(self.hparams.diagnostic_items)
        if n <= 0 or not hasattr(datamodule, "gold_batch"):
            return {}
        items = datamodule.items()
        with torch.inference_mode(False), torch.enable_grad():
            harmful = datamodule.gold_batch([it for it in items if it.kind == "harmful"], n)
            benign = datamodule.gold_batch(round_robin_tasks([it for it in items if it.kind != "harmful"]), n)
            if harmful is None or benign is None:
                return {}
            move = lambda b: {k: v.to(self.device) for k, v in b.items()}  # noqa: E731
            return {"diagnostics/grad_cosine": gradient_cosine(self.model, self.trainable_parameters() or
                                                               list(self.model.parameters()), move(harmful), move(benign))}

    def on_test_epoch_end(self) -> None:
        results = {k: float(v) for k, v in {**self.harmful_metric.compute(), **self.task_metric.compute(),
                                            **self.loss_metric.compute(), **self.refusal_metric.compute()}.items()}
        _, tasks = self.trainer.datamodule.eval_spec()
        items = self.trainer.datamodule.items()
        for task, mode in tasks.items():
            results[f"chance/{task}"] = chance_level(mode, [it.reference for it in items if it.kind == task], match_answer)
        results.update(self.test_diagnostics())
        lm_eval_samples = None
        if self.lm_eval_spec is not None:
            # lm-eval on global rank 0 (it is handed a single-process model), its metrics broadcast so every rank
            # logs the same results; under FSDP2 a forward is a collective, so every rank runs the same requests.
            # Under DDP the other ranks wait in the broadcast: a long suite needs the strategy's timeout to cover it.
            from immunize.lightning_modules.evaluation.lm_eval_bridge import run_lm_eval

            spec = self.lm_eval_spec
            distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            every_rank = not distributed or is_fsdp_model(self.model)
            payload: list = [None]
            if every_rank or dist.get_rank() == 0:
                try:
                    out = run_lm_eval(self.model, self.tokenizer, spec["tasks"], spec["num_fewshot"], spec["limit"],
                                      spec["include_path"], spec["batch_size"])
                    payload, lm_eval_samples = [out["metrics"]], out["samples"]
                except Exception as err:
                    if every_rank:
                        raise
                    payload = [err]  # handed to the other ranks, so that they stop too
            if not every_rank:
                dist.broadcast_object_list(payload, src=0)
            if isinstance(payload[0], BaseException):
                raise payload[0]
            results.update(payload[0])
            if "lm_eval/average" in payload[0]:
                results["capability/lm_eval"] = payload[0]["lm_eval/average"]
        self.log_dict(results, sync_dist=False, rank_zero_only=True)
        rows = self._generations
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        self.test_results = results
        out_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # log_dir is a collective: all ranks
        if self.trainer.is_global_zero:
            if self.logger is not None and not getattr(self.logger, "log_dir", None) and self.logger.version is not None:
                out_dir = out_dir / str(self.logger.version)  # loggers without a versioned dir (W&B): one per run
            atomic_write_jsonl(out_dir / "generations.jsonl", rows)
            if lm_eval_samples is not None:
                atomic_write_jsonl(out_dir / "lm_eval_samples.jsonl", lm_eval_samples)
            atomic_write_json(out_dir / "metrics.json", results)
            self._log_generation_table(rows)

    def _log_generation_table(self, rows: list[dict]) -> None:
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                columns = ["kind", "category", "prompt", "answer", "reference"]
                logger.log_text(key="generations", columns=columns, data=[[str(r.get(c)) for c in columns] for r in rows])

    def predict_step(self, batch, batch_idx):
        answers = self.generate(batch["input_ids"], batch["attention_mask"])
        return [{"prompt": it.prompt, "answer": a} for it, a in zip(batch["items"], answers)]

    # ----- export ------------------------------------------------------------------------------
    def write_export_extras(self, folder: Path) -> None:
        """Files a method keeps beside its exported model (e.g. refusal ablation's direction), written into the
        export's staging folder, so they are swapped in with the model or not at all; nothing by default."""

    def prepare_export(self) -> None:
        """Every rank calls this before rank 0 exports: under FSDP2 it gathers the full weights into an unsharded
        CPU copy of the model on rank 0 (a collective); otherwise nothing."""
        if not is_fsdp_model(self.model):
            return
        drop_gathered()  # a callback may have changed the weights in place after the last forward
        state = full_state_dict(self.model)
        if state is None:
            return
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            copy_ = AutoModelForCausalLM.from_config(base.config)
        if self.lora_spec is not None:
            copy_ = apply_lora(copy_, self.lora_spec)
        copy_.load_state_dict(state, strict=True, assign=True)
        copy_.tie_weights()
        copy_.generation_config = base.generation_config
        self._export_copy = copy_

    def export(self, dirpath: Union[str, os.PathLike], merge_lora: Optional[bool] = None) -> Path:
        """save_pretrained (safetensors) with the tokenizer; a LoRA model merged, or (merge_lora False, default:
        export_lora "adapter") its base weights unmerged with the adapter in `adapter/`. The model is
        written to a staging folder beside `dirpath` and swapped in whole (immunize.outputs.replace_dir): an
        earlier export there stays until the new one is complete, and a folder immunize did not write is never
        replaced. Under FSDP2, call prepare_export() on every rank first; rank 0 then writes the gathered weights."""
        if is_fsdp_model(self.model) and self._export_copy is None:
            raise RuntimeError("export of an FSDP-sharded model needs prepare_export() on every rank first")
        model = self._export_copy if self._export_copy is not None else self.model
        merge = self.export_lora == "merged" if merge_lora is None else merge_lora
        is_peft = hasattr(model, "merge_and_unload")
        hf_model = model.get_base_model() if is_peft else model
        trainer = getattr(self, "_trainer", None)
        dtype = resolve_dtype(self.export_dtype, getattr(trainer, "precision", None), hf_model)
        staging = prepare_staging(dirpath)
        try:
            if is_peft and not merge:
                model.save_pretrained(staging / ADAPTER_DIR, safe_serialization=True)
            if supported(hf_model):  # tensor by tensor, LoRA merged per layer: no copy of the model
                write_weights(staging, weight_entries(hf_model, merge), dtype)
                write_config(staging, hf_model, dtype)
            elif is_peft:  # a peft wrapper the writer does not know: peft's own merge, on a copy
                plain = copy.deepcopy(model)
                plain = plain.merge_and_unload() if merge else plain.unload()
                plain.to(dtype).save_pretrained(staging, safe_serialization=True)
            else:  # quantized weights: transformers writes them in their own format
                model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            self.write_export_extras(staging)
            return replace_dir(staging, dirpath)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
