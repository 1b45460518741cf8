"""The contract every registered defense keeps, parametrized over the registry (immunize.bench.registry):

- alignment defenses (their toy config's model section on toy:tiny): two finite steps that move the weights;
  the precisions their base refuses are refused with one UserError, bf16-mixed trains; 2 DDP ranks end identical;
- fine-tuning-stage callbacks (their toy config's callbacks on a small fine-tune): a fit stopped after its
  checkpoint and resumed ends where the uninterrupted fit ends. A callback whose config leaves base_model to the bench
  (SafeLoRA) gets a saved toy base model and a LoRA fine-tune.
"""
import importlib

import pytest
import torch

from conftest import REPO
from immunize.datamodules import Source
from helpers.ranks import assert_ranks_identical
from helpers.alignment import fit, params_of, write_ddp_config
from helpers.finetune import crash_and_resume, module, toy_model_dir
from immunize.bench import registry
from immunize.bench.stages import read_yaml
from immunize.errors import UserError
from immunize.lightning_modules import MultiPassDefense

ALIGNMENT = [d for d in registry.of_stage(registry.ALIGNMENT) if d.class_path]
FINETUNE = [d for d in registry.of_stage(registry.FINETUNE) if d.class_path]


def _class(path: str):
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def toy_init_args(defense) -> dict:
    cfg = read_yaml(REPO / defense.config, defense.name)
    assert cfg["model"]["class_path"] == defense.class_path
    return {**cfg["model"].get("init_args", {}), "model": "toy:tiny"}


def build(defense, **overrides):
    return _class(defense.class_path)(**{**toy_init_args(defense), **overrides})


def toy_callbacks(defense, **overrides) -> list:
    cfg = read_yaml(REPO / defense.config, defense.name)
    out = []
    for spec in cfg["trainer"]["callbacks"]:
        assert spec["class_path"] == defense.class_path
        args = {**spec.get("init_args", {}), **overrides}
        for key in ("harmful", "alignment"):  # keep the test's data small
            if key in args:
                args[key] = Source(**{**args[key], "limit": 16})
        if spec["class_path"] == "immunize.callbacks.Panacea":
            args["eps_file"] = None
        out.append(_class(spec["class_path"])(**args))
    return out


def needs_base_model(defense) -> bool:
    """Whether the defense's toy callbacks take the unaligned base model (filled in by the bench; SafeLoRA)."""
    cfg = read_yaml(REPO / defense.config, defense.name)
    return any("base_model" in (spec.get("init_args") or {}) for spec in cfg["trainer"]["callbacks"])


def test_the_registry_is_complete_and_has_no_dead_entries():
    names = [d.name for d in registry.DEFENSES]
    assert len(names) == len(set(names))
    for d in registry.DEFENSES:
        for path in (d.config, d.real_config):
            assert path is None or (REPO / path).is_file(), (d.name, path)
        if d.class_path:
            assert _class(d.class_path) is not None
    from immunize import callbacks, lightning_modules

    exported = {f"immunize.lightning_modules.{n}" for n in lightning_modules.__all__} | \
        {f"immunize.callbacks.{n}" for n in callbacks.__all__}
    assert {d.class_path for d in registry.DEFENSES if d.class_path} <= exported
    real = {p.name for p in (REPO / "configs" / "real").glob("*.yaml")}
    assert {str(d.real_config).rsplit("/", 1)[-1] for d in registry.DEFENSES if d.real_config} <= real
    assert not list((REPO / "configs" / "defenses").glob("*llama*"))  # real-scale configs are not toy defenses


def test_the_readme_method_table_is_the_registry():
    from immunize.readme import markers, methods_table

    text = (REPO / "README.md").read_text()
    begin, end = markers("methods")
    assert text.split(begin, 1)[1].split(end, 1)[0].strip() == methods_table().strip(), \
        "README's method table is stale: python -m immunize.readme --block methods --methods"


@pytest.mark.parametrize("defense", ALIGNMENT, ids=lambda d: d.name)
def test_alignment_defense_takes_two_finite_steps(defense):
    m = build(defense)
    before = params_of(m)
    t = fit(m, steps=2)
    assert t.global_step == 2
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(params_of(m), before))


@pytest.mark.parametrize("defense", ALIGNMENT, ids=lambda d: d.name)
def test_alignment_defense_precisions(defense):
    m = build(defense)
    if isinstance(m, MultiPassDefense):  # manual passes: no loss scaler, fp32 master weights
        with pytest.raises(UserError, match="bf16-mixed"):
            fit(build(defense), precision="bf16-true")
    t = fit(m, precision="bf16-mixed")
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters())


@pytest.mark.slow  # 20-25 s per defense; SEAM, Booster and Vaccine also have DDP tests in the default run
@pytest.mark.parametrize("defense", ALIGNMENT, ids=lambda d: d.name)
def test_alignment_defense_ddp_ranks_stay_identical(defense, tmp_path, cli):
    init = {**toy_init_args(defense), "optimizer": "sgd", "lr": 0.05}
    dump = tmp_path / "dump"
    result = cli("fit", "--config", write_ddp_config(tmp_path, defense.class_path, init, 3, dump), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_ranks_identical(dump)


@pytest.mark.parametrize("defense", FINETUNE, ids=lambda d: d.name)
def test_callback_resume_equals_uninterrupted(defense, tmp_path):
    """One batch per epoch (the datamodule's shuffle is not checkpointed, so only whole epochs resume exactly) and a
    checkpoint every epoch: stopped by a crash after step 2's checkpoint, then resumed, the fit ends (fit-end action
    included) where the uninterrupted one ends."""
    lora = needs_base_model(defense)  # SafeLoRA: a LoRA fine-tune, projected against a saved toy base
    extra = {"base_model": toy_model_dir(tmp_path / "base")} if lora else {}
    (whole, *_), (resumed, *_) = crash_and_resume(tmp_path, lambda: (module(lora=lora, optimizer="sgd", lr=1e-2),
                                                                      *toy_callbacks(defense, **extra)))
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), name
