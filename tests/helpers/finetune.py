"""Fine-tuning-stage test helpers: a toy harmful mix, small SFT modules, trainers, step recorders, a crash."""
from __future__ import annotations

import lightning as L
import torch

from immunize.datamodules import HarmfulMix, Source
from immunize.datamodules.catalog import as_examples, load_records
from immunize.datamodules.collate import encode_example
from immunize.lightning_modules import SFT
from immunize.lightning_modules.functional.grad_math import masked_ce

BENIGN = Source(kind="toy", part="benign", split="finetune", tasks=["arithmetic"], limit=40)
ATTACK = Source(kind="toy", part="harmful", split="attack", limit=20)
H_SET = Source(kind="toy", part="harmful", split="align", limit=30)


def data(n: int = 16, batch_size: int = 4) -> HarmfulMix:
    return HarmfulMix(benign=BENIGN, harmful=ATTACK, n=n, p=0.25, batch_size=batch_size)


def module(lora: bool = False, **kw) -> SFT:
    spec = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} if lora else None
    return SFT(model="toy:tiny", lora=spec, **kw)


def trainer(tmp_path, callbacks, **kw) -> L.Trainer:
    kw.setdefault("max_steps", 2)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=kw.pop("enable_checkpointing", False),
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     default_root_dir=str(tmp_path), **kw)


def params_of(m) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.model.named_parameters()}


class Recorder(L.Callback):
    """Snapshots: weights and batch at step start, p.grad and weights when the optimizer is about to step, weights at train end."""

    def __init__(self):
        self.steps, self.at_train_end = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"before": params_of(pl_module), "batch": {k: v.clone() for k, v in batch.items()}})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["grad"] = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}
        self.steps[-1]["at_hook"] = params_of(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.at_train_end = params_of(pl_module)


class Crash(L.Callback):
    """Stops a fit with an error at a given step (a crash after the checkpoint)."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def module_with(weights: dict) -> SFT:
    """A fresh toy:tiny SFT module holding `weights` (name -> tensor)."""
    ref = module()
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            p.copy_(weights[n])
    return ref


def grads_at(weights: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Response-only CE gradient of a fresh toy:tiny holding `weights`, on `batch`."""
    ref = module_with(weights)
    loss = masked_ce(ref.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    names, params = zip(*ref.model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def encoded(source: Source, use: str, tokenizer) -> list[dict]:
    return [encode_example(tokenizer, "qa", e.prompt, e.response, 256) for e in as_examples(load_records(source), use)]


def crash_and_resume(tmp_path, build, max_steps: int = 4, crash_at: int = 3):
    """The same fit three times: uninterrupted; crashed at step `crash_at` after a checkpoint every epoch; resumed
    from the checkpoint of step 2. One batch per epoch (data(n=8, batch_size=8)): the datamodule's shuffle is not
    checkpointed, so only whole epochs resume exactly. `build()` returns (module, callback, ...) with torch seeded;
    returns (uninterrupted, resumed), each what build returned."""
    def run(root, extra=(), ckpt_path=None, **kw):
        torch.manual_seed(0)
        built = build()
        tr = trainer(root, [*built[1:], *extra], max_steps=max_steps, max_epochs=-1, **kw)
        try:
            tr.fit(built[0], data(n=8, batch_size=8), ckpt_path=ckpt_path)
        except RuntimeError as err:
            assert "simulated crash" in str(err)
        return built

    full = run(tmp_path / "full")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    run(tmp_path / "crash", extra=[ckpt, Crash(at_step=crash_at)], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=1-step=2.ckpt"
    assert path.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    return full, run(tmp_path / "resumed", ckpt_path=str(path))


def run_ddp_finetune(cli, tmp_path, callbacks: list[dict], max_steps: int):
    """`immunize fit` of toy:tiny SFT on the toy harmful mix on 2 CPU processes (DDP, gloo) with these trainer
    callbacks (class_path + init_args), exporting to tmp_path/export; returns the completed process."""
    import yaml

    cfg = {
        "model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"model": "toy:tiny", "lr": 1e-3}},
        "data": {"class_path": "immunize.datamodules.HarmfulMix", "init_args": {
            "benign": vars(BENIGN), "harmful": vars(ATTACK), "n": 16, "p": 0.25, "batch_size": 4}},
        "trainer": {"max_steps": max_steps, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "root"), "callbacks": callbacks},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return cli("fit", "--config", "cfg.yaml", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.accelerator", "cpu", "--export_dir", "export", timeout=300)


def toy_model_dir(path, init_seed: int = 1, preset: str = "toy:tiny") -> str:
    """A saved (safetensors) toy model with tokenizer at `path`: a fresh seeded init of `preset` (the base model a
    SafeLoRA test projects against: init_seed 0 is the model the fine-tunes here start from)."""
    m = SFT(model=preset, init_seed=init_seed)
    m.model.save_pretrained(str(path))
    m.tokenizer.save_pretrained(str(path))
    return str(path)
