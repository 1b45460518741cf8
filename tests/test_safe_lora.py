"""SafeLoRA (immunize.callbacks.SafeLoRA and lightning_modules.functional.safe_lora): the projector, the cosine, the
selection by number (ties included) and by threshold, 1-D tensors left alone, the one-line errors, and a LoRA fit on
the toy world whose lora_B changes in the selected modules only."""
from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from helpers.finetune import Recorder, data, module, params_of, toy_model_dir, trainer
from immunize.callbacks import SafeLoRA
from immunize.callbacks.safe_lora import lora_modules
from immunize.errors import UserError
from immunize.lightning_modules.functional.safe_lora import (alignment_projector, cosine_threshold, distance_score,
                                                             projected_cosine, selected_modules)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return toy_model_dir(tmp_path_factory.mktemp("base") / "base")


def _one_line_error(fn, match):
    with pytest.raises(UserError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


# ----- the math ----------------------------------------------------------------------------------
def test_projector_is_v_vt_over_the_frobenius_norm_and_not_idempotent():
    gen = torch.Generator().manual_seed(0)
    base, aligned = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    v = (aligned - base).double()
    c = alignment_projector(aligned, base)
    assert c.shape == (6, 6) and c.dtype == torch.float32
    assert torch.allclose(c.double(), v @ v.T / v.pow(2).sum().sqrt(), atol=1e-6)
    # rank one V = s u w^T: C = s u u^T (sigma^2 / ||V||_F), a projector only when s = 1
    u, w = torch.tensor([3.0, 4.0, 0.0]) / 5, torch.tensor([1.0, 0.0])
    rank_one = alignment_projector(4 * torch.outer(u, w), torch.zeros(3, 2))
    assert torch.allclose(rank_one, 4 * torch.outer(u, u), atol=1e-6)
    assert not torch.allclose(rank_one @ rank_one, rank_one)
    assert torch.isnan(alignment_projector(aligned, aligned)).all()  # alignment left this weight as it was
    with pytest.raises(ValueError, match="2-D"):
        alignment_projector(aligned, base[:, :3])


def test_cosine_is_that_of_the_flattened_products_rounded_to_5_decimals():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(8, 5, generator=gen)
    c = alignment_projector(v, torch.zeros(8, 5))
    b, a = torch.randn(8, 3, generator=gen), torch.randn(3, 5, generator=gen)
    flat = [((c @ b) @ a).double().reshape(1, -1), (b @ a).double().reshape(1, -1)]
    direct = torch.nn.functional.cosine_similarity(*flat)
    got = projected_cosine(c, b, a)
    assert got == pytest.approx(float(direct), abs=5e-6) and got == round(got, 5)
    assert projected_cosine(torch.eye(8), b, a) == 1.0  # nothing to project away
    assert projected_cosine(c, torch.zeros(8, 3), a) == 0.0  # an untrained lora_B (peft's zero init)
    assert math.isnan(projected_cosine(alignment_projector(v, v), b, a))


def test_number_mode_takes_the_k_lowest_and_every_tie_at_the_kth():
    cosines = [0.3, 0.1, 0.3, 0.5, 0.2]
    assert cosine_threshold(cosines, "number", 2, 0.5) == 0.2
    assert selected_modules(cosines, 0.2) == [False, True, False, False, True]
    thr = cosine_threshold(cosines, "number", 3, 0.5)  # the 3rd lowest is 0.3, held by two modules: four are taken
    assert thr == 0.3 and selected_modules(cosines, thr) == [True, True, True, False, True]
    assert all(selected_modules(cosines, cosine_threshold(cosines, "number", 10, 0.5)))  # k above the count: all
    with_nan = [math.nan, 0.4, 0.2]
    assert cosine_threshold(with_nan, "number", 1, 0.5) == 0.2
    assert selected_modules(with_nan, cosine_threshold(with_nan, "number", 3, 0.5)) == [False, True, True]
    with pytest.raises(ValueError, match="num_proj_layers"):
        cosine_threshold(cosines, "number", 0, 0.5)


def test_threshold_mode_projects_at_or_below_the_threshold():
    cosines = [0.49, 0.5, 0.51, -0.2]
    thr = cosine_threshold(cosines, "threshold", 1, 0.5)
    assert thr == 0.5 and selected_modules(cosines, thr) == [True, True, False, True]
    with pytest.raises(ValueError, match="select"):
        cosine_threshold(cosines, "layers", 1, 0.5)


def test_distance_score():
    b = torch.ones(4, 2)
    assert distance_score(b, b.clone()) == 1.0
    assert distance_score(b, torch.zeros(4, 2)) == pytest.approx(1 / (1 + math.sqrt(8)))


# ----- 1-D tensors and non-linear adapters are left alone ------------------------------------------
def test_biases_and_embedding_adapters_are_skipped(tmp_path):
    """A model with q/v biases (1-D tensors whose names hold the target names: the reference would feed them to
    torch.mm) and a LoRA on the embedding: only the 2-D linear weights are projected; biases and the embedding adapter
    stay as they are."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      attention_bias=True, max_position_embeddings=16)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_()
    names = [n for n, _, _ in lora_modules(model)]
    assert names == ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = SafeLoRA(base_model=str(tmp_path / "base"), select="threshold", threshold=1.0).project(model)
    assert report["modules"] == 2 and report["projected"] == 2
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora_b = "base_model.model.model.layers.0.self_attn.{}.lora_B.default.weight"
    assert changed == {lora_b.format(m) for m in ("q_proj", "v_proj")}


# ----- bad input: one line naming the thing and the fix ------------------------------------------
def test_constructor_errors():
    _one_line_error(lambda: SafeLoRA(), "base_model is required")
    _one_line_error(lambda: SafeLoRA(base_model="b", select="layers"), "select must be one of number, threshold")
    _one_line_error(lambda: SafeLoRA(base_model="b", num_proj_layers=0), "num_proj_layers")
    _one_line_error(lambda: SafeLoRA(base_model="b", threshold=float("nan")), "threshold")


def test_a_full_fine_tune_is_refused_before_training(tmp_path, base_dir):
    m = module()
    tr = trainer(tmp_path, [SafeLoRA(base_model=base_dir)])
    _one_line_error(lambda: tr.fit(m, data()), "no LoRA adapters.*model.init_args.lora")
    assert tr.global_step == 0


def test_base_model_errors(tmp_path, base_dir):
    m = module(lora=True)
    _one_line_error(lambda: SafeLoRA(base_model=str(tmp_path / "nowhere")).check(m.model), "does not exist")
    other = toy_model_dir(tmp_path / "small", preset="toy:small")
    msg = _one_line_error(lambda: SafeLoRA(base_model=other).check(m.model), "has shape")
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "same architecture" in msg
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: SafeLoRA(base_model=str(tmp_path / "empty")).check(m.model), "no tokenizer")
    next(layer for _, layer, _ in lora_modules(m.model)).get_base_layer().weight.requires_grad_(True)
    _one_line_error(lambda: SafeLoRA(base_model=base_dir).check(m.model), "trains with its LoRA.*aligned_model")


# ----- a LoRA fit on the toy world -----------------------------------------------------------------
def _lora_b(report_name: str) -> str:
    return f"base_model.model.{report_name[:-len('.weight')]}.lora_B.default.weight"


def test_fit_projects_lora_b_of_the_selected_modules_only(tmp_path, base_dir):
    torch.manual_seed(0)  # peft's lora_A init and the data order
    m, rec = module(lora=True, optimizer="sgd", lr=0.5), Recorder()
    cb = SafeLoRA(base_model=base_dir, num_proj_layers=2)
    tr = L.Trainer(accelerator="cpu", devices=1, max_steps=3, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[rec, cb], default_root_dir=str(tmp_path),
                   logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="", version="csv"))
    tr.fit(m, data())
    report = cb.report
    assert report["modules"] == 4 and report["projected"] == 2  # toy:tiny, LoRA on q/v of 2 layers
    chosen = {n for n, r in report["per_module"].items() if r["projected"]}
    lowest = sorted(report["per_module"], key=lambda n: report["per_module"][n]["cosine"])[:2]
    assert chosen == set(lowest)
    trained, after = rec.at_train_end, params_of(m)
    changed = {n for n in after if not torch.equal(after[n], trained[n])}
    assert changed == {_lora_b(n) for n in chosen}  # lora_A, the other lora_B and every base weight unchanged
    assert all(0 < r["distance"] <= 1 for r in report["per_module"].values())
    assert report["distance"] == pytest.approx(sum(r["distance"] for r in report["per_module"].values()) / 4)
    saved = json.loads((tmp_path / "csv" / "safe_lora.json").read_text())
    assert saved["projected"] == 2 and set(saved["per_module"]) == set(report["per_module"])
    logged = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "safe_lora/projected_modules" in logged and "safe_lora/distance" in logged

    # aligned_model given explicitly (the model the fine-tune started from): the same projection
    torch.manual_seed(0)
    again, rec2 = module(lora=True, optimizer="sgd", lr=0.5), Recorder()
    start = toy_model_dir(tmp_path / "start", init_seed=0)
    cb2 = SafeLoRA(base_model=base_dir, aligned_model=start, num_proj_layers=2, report_file=None)
    trainer(tmp_path / "again", [rec2, cb2], max_steps=3).fit(again, data())
    assert cb2.report["per_module"] == report["per_module"]
    assert all(torch.allclose(p, after[n], atol=1e-6) for n, p in params_of(again).items())


def test_a_sharded_fit_is_refused_at_setup(base_dir):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    fake = SimpleNamespace(strategy=ModelParallelStrategy(), datamodule=None)
    _one_line_error(lambda: SafeLoRA(base_model=base_dir).setup(fake, module(lora=True), "fit"), "FSDP-sharded.*DDP")
