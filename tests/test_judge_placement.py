"""A judge model runs where the evaluated model runs: on the evaluating module's device, in bfloat16 when the trainer
runs bf16, in float32 otherwise; a device or dtype written in the judge's spec wins."""
import lightning as L
import pytest
import torch

from immunize.judges import make_judge
from immunize.lightning_modules import CausalLMModule


def _module(judge):
    return CausalLMModule(model="toy:tiny", judge=judge, diagnostic_items=0)


def _attach(module, precision):
    module.trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False,
                               enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return module


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", "bfloat16"), ("bf16-true", "bfloat16"),
                                              ("32-true", "float32"), ("32", "float32"), ("bf16", "bfloat16")])
def test_judge_dtype_follows_the_trainer_precision(precision, dtype):
    for spec in ({"name": "beaver_dam", "model": "org/beaver"}, {"name": "llama_guard_3", "model": "org/guard"}):
        judge = _attach(_module(spec), precision).judge
        assert (judge.dtype, judge.device) == (dtype, "cpu"), (spec["name"], precision)


def test_without_a_trainer_the_judge_is_float32_on_the_module_device():
    module = _module({"name": "wildguard", "model": "org/wildguard"})
    assert module.judge_placement() == {"device": "cpu", "dtype": "float32"}
    module.to(torch.device("meta"))  # the module moved: the judge follows it, not the CPU default
    assert module.judge.device == "meta"


def test_a_spec_that_sets_device_or_dtype_keeps_it():
    module = _attach(_module({"name": "qwen3guard", "model": "org/q", "dtype": "float16", "device": "cuda:3"}),
                     "bf16-mixed")
    assert (module.judge.dtype, module.judge.device) == ("float16", "cuda:3")
    kept = _attach(_module({"name": "moderation", "model": "org/m", "dtype": "float32"}), "bf16-true").judge
    assert kept.dtype == "float32"


def test_judges_without_a_model_take_no_placement():
    module = _attach(_module("keyword"), "bf16-mixed")
    assert module.judge.score(["p"], ["Sure, here it is."]) == [1.0]
    assert make_judge("oracle", defaults={"device": "cpu", "dtype": "bfloat16"}) is not None


def test_a_judge_loaded_under_bf16_has_bf16_weights(tmp_path):
    from helpers.classifiers import save_tiny_classifier as _save_tiny_classifier

    path = _save_tiny_classifier(tmp_path / "clf", [0.0, 1.0], {0: "safe", 1: "unsafe"})
    judge = _attach(_module({"name": "classifier", "model": path}), "bf16-mixed").judge
    judge.load()
    assert next(judge._model.parameters()).dtype == torch.bfloat16
    assert 0.0 <= judge.score(["how"], ["sure here is"])[0] <= 1.0


def test_an_evaluation_says_where_its_judge_ran(tmp_path, capsys):
    from helpers.classifiers import save_tiny_classifier as _save_tiny_classifier
    from immunize.datamodules import EvalData, Source

    path = _save_tiny_classifier(tmp_path / "clf", [0.0, 1.0], {0: "safe", 1: "unsafe"})
    module = CausalLMModule(model="toy:tiny", judge={"name": "classifier", "model": path}, diagnostic_items=0,
                            max_new_tokens=2)
    data = EvalData(n_harmful_per_category=1, n_per_task=1, sources=[Source(kind="toy")])
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.test(module, datamodule=data, verbose=False)
    assert f"immunize test: judge {type(module.judge).__name__} on cpu (bfloat16)" in capsys.readouterr().err
