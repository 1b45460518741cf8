"""Alignment-stage test helpers: toy triplet data, short fits, gradient capture, DDP configs."""
from __future__ import annotations

import copy

import lightning as L
import torch
import yaml

from immunize.datamodules import AlignmentData, Source
from immunize.lightning_modules.functional.grad_math import dot, global_norm, masked_ce

PAIRS = {"kind": "toy", "part": "pairs", "split": "align", "categories": "seen"}
BENIGN = {"kind": "toy", "part": "benign", "split": "align"}


class Capture(L.Callback):
    """Keeps each training batch and the gradients the optimizer is about to apply."""

    def __init__(self):
        self.batches, self.grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(copy.deepcopy(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in pl_module.trainable_parameters()])


def data(batch_size=2, limit=8, **kwargs):
    return AlignmentData(pairs=Source(**{**PAIRS, "limit": limit}), benign=Source(**{**BENIGN, "limit": limit}),
                         mode="triplets", template="qa", batch_size=batch_size, **kwargs)


def first_batch(module, **kwargs) -> dict:
    dm = data(**kwargs)
    dm.connect(module.tokenizer)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def fit(module, steps=1, callbacks=(), precision="32-true", **data_kwargs):
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=data(**data_kwargs))
    return trainer


def params_of(module):
    return [p.detach().clone() for p in module.trainable_parameters()]


def cosine(a, b) -> float:
    return float(dot(a, b) / (global_norm(a) * global_norm(b)))


def rel_err(a, b) -> float:
    return float(global_norm([x - y for x, y in zip(a, b)]) / global_norm(b))


def run(model, part, **kw):
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], **kw)


def ce(model, part):
    return masked_ce(run(model, part).logits, part["labels"])


FSDP_STRATEGY = {"class_path": "immunize.strategies.FSDP2"}


def write_ddp_config(tmp_path, class_path: str, init: dict, steps: int, dump, strategy="ddp", callbacks=()) -> str:
    """A 2-process fit (DDP, or FSDP2 with strategy=FSDP_STRATEGY) of `class_path` on 4 triplets; each rank dumps
    its parameters to `dump`."""
    if "." not in class_path:
        class_path = f"lightning_modules.{class_path}"
    config = {
        "model": {"class_path": class_path, "init_args": init},
        "data": {"class_path": "immunize.datamodules.AlignmentData",
                 "init_args": {"mode": "triplets", "template": "qa", "batch_size": 2,
                               "pairs": {**PAIRS, "limit": 4}, "benign": {**BENIGN, "limit": 4}}},
        "trainer": {"max_steps": steps, "accelerator": "cpu", "devices": 2, "strategy": strategy, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "tests.helpers.ranks.DumpParameters", "init_args": {"dirpath": str(dump)}},
                                  *callbacks]},
    }
    kind = "ddp" if strategy == "ddp" else "fsdp"
    path = tmp_path / f"{kind}_{class_path.rsplit('.', 1)[-1]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def float64_step(module, batch: dict, callbacks=()) -> tuple:
    """One optimizer step of `module` on `batch` in float64 (a fit of one step on that batch alone): (a float64 copy
    of the model before the step, the update of every trainable tensor). The conformance tests' fit."""
    start = copy.deepcopy(module.model).double()
    before = [p.detach().clone() for p in start.parameters() if p.requires_grad]  # the trainable ones (LoRA: adapters)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, precision="64-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    assert trainer.global_step == 1
    return start, [a.detach() - b for a, b in zip(module.trainable_parameters(), before)]
