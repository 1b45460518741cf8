"""export(dir) writes a Hugging Face directory (safetensors + tokenizer) that reloads to identical logits."""
import pytest
import torch

from conftest import REPO

from immunize.errors import UserError
from immunize.lightning_modules import CausalLMModule


def _logits(module, tokenizer):
    ids = tokenizer("question : what is the capital of brinou ? answer :", return_tensors="pt").input_ids
    module.eval()
    with torch.no_grad():
        return module(ids).logits


def _train_lora_b(module) -> None:
    """Give the LoRA B matrices (zero at init) values, as training would, so a merge changes the weights."""
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)


def test_export_reload_gives_identical_logits(tmp_path, toy_tokenizer):
    module = CausalLMModule(model="toy:tiny", init_seed=1)
    out = module.export(tmp_path / "model")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.bin"))
    reloaded = CausalLMModule(model=str(out))
    assert torch.equal(_logits(module, toy_tokenizer), _logits(reloaded, reloaded.tokenizer))
    assert reloaded.tokenizer.get_vocab() == module.tokenizer.get_vocab()


def test_lora_export_is_merged_and_matches(tmp_path, toy_tokenizer):
    module = CausalLMModule(model="toy:tiny", lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train_lora_b(module)
    out = module.export(tmp_path / "merged")
    reloaded = CausalLMModule(model=str(out))
    assert not any("lora" in n for n, _ in reloaded.model.named_parameters())
    assert torch.allclose(_logits(module, toy_tokenizer), _logits(reloaded, reloaded.tokenizer), atol=1e-5)


def test_an_adapter_export_keeps_the_base_and_the_adapter_and_a_later_stage_merges_or_continues_it(tmp_path, toy_tokenizer):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    module = CausalLMModule(model="toy:tiny", lora=lora, export_lora="adapter")
    _train_lora_b(module)
    out = module.export(tmp_path / "aligned")
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    merged = CausalLMModule(model=str(out))  # default: the adapter folded in, the model the stage trained
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    assert torch.allclose(_logits(module, toy_tokenizer), _logits(merged, merged.tokenizer), atol=1e-5)
    from safetensors.torch import load_file

    base = CausalLMModule(model="toy:tiny").model.state_dict()  # the same seed's init: the adapter's base
    top = load_file(str(out / "model.safetensors"))
    assert top and all(torch.equal(t, base[k]) for k, t in top.items())  # the top-level weights: the base, unmerged
    continued = CausalLMModule(model=str(out), adapter="continue")
    trainable = {n: p for n, p in continued.model.named_parameters() if p.requires_grad}
    saved = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(saved)
    assert all(torch.equal(a, b) for a, b in zip(trainable.values(), saved.values()))  # the same adapter, trainable
    assert torch.allclose(_logits(module, toy_tokenizer), _logits(continued, toy_tokenizer), atol=1e-5)
    assert continued.lora_spec["r"] == 4 and continued.lora_spec["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="lora null"):
        CausalLMModule(model=str(out), adapter="continue", lora=lora)
    with pytest.raises(UserError, match="no saved adapter"):
        CausalLMModule(model=str(module.export(tmp_path / "merged", merge_lora=True)), adapter="continue")


def test_gguf_fit_export_reload_round_trip(tmp_path):
    """A model loaded from GGUF (dequantised, marked quantized by transformers) trains, exports as safetensors and
    reloads with identical logits."""
    import lightning as L

    from immunize.datamodules import SFTData, Source
    from gguf_writer import write_tiny_llama_gguf

    write_tiny_llama_gguf(tmp_path / "tiny.gguf", seed=0)
    module = CausalLMModule(model=str(tmp_path), gguf_file="tiny.gguf")
    assert not getattr(module.model, "is_quantized", False)
    from immunize.lightning_modules import SFT

    sft = SFT(model=str(tmp_path), gguf_file="tiny.gguf", lr=1e-3)
    data = SFTData(train=[Source(kind="alpaca", path=str(_alpaca_file(tmp_path)))], template="plain", batch_size=2)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(sft, datamodule=data)
    sft.export(tmp_path / "exported")
    reloaded = CausalLMModule(model=str(tmp_path / "exported"))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(sft.model(ids).logits, reloaded.model(ids).logits)


def _alpaca_file(tmp_path):
    import json

    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps({"instruction": f"say {w}", "input": "", "output": f"the {w} cat"})
                              for w in ("red", "blue", "green", "hat")))
    return path


@pytest.mark.parametrize("error, needle", [(OSError(28, "No space left on device"), "No space left on device"),
                                           (ValueError("PosixPath('.') has an empty name"), "empty name")])
def test_export_failure_after_training_keeps_the_model_and_says_where(tmp_path, monkeypatch, error, needle):
    from immunize.cli import FALLBACK_PREFIX, export_or_keep
    from immunize.errors import UserError

    module = CausalLMModule(model="toy:tiny")
    original = CausalLMModule.export

    def export(self, dirpath, merge_lora=True):
        if "target" in str(dirpath):
            raise error
        return original(self, dirpath, merge_lora)

    monkeypatch.setattr(CausalLMModule, "export", export)
    with pytest.raises(UserError) as excinfo:
        export_or_keep(module, str(tmp_path / "target"), tmp_path / "root")
    message = str(excinfo.value)
    kept = list((tmp_path / "root").glob(f"{FALLBACK_PREFIX}-*"))
    assert len(kept) == 1 and "\n" not in message and needle in message and str(kept[0]) in message
    assert (kept[0] / "model.safetensors").is_file()


def test_unwritable_export_dir_fails_before_training(tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = cli("fit", "--config", str(REPO / "configs" / "toy" / "align.yaml"), "--model.init_args.model", "toy:tiny",
                 "--export_dir", str(blocker / "model"), "--trainer.logger", "false")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot be written" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("missing, needle", [("tokenizer", "has no tokenizer"), ("config", "has no config.json"),
                                             ("weights", "has no weights")])
def test_model_directory_missing_a_part_is_one_line(tmp_path, missing, needle):
    from immunize.errors import UserError

    module = CausalLMModule(model="toy:tiny")
    module.export(tmp_path / "model")
    for path in (tmp_path / "model").iterdir():
        if (missing == "tokenizer" and path.name.startswith(("tokenizer", "special_tokens"))) or \
                (missing == "config" and path.name == "config.json") or \
                (missing == "weights" and path.name.endswith(".safetensors")):
            path.unlink()
    with pytest.raises(UserError, match=needle) as excinfo:
        CausalLMModule(model=str(tmp_path / "model"))
    assert "\n" not in str(excinfo.value)


def test_lora_takes_any_peft_lora_config_field_and_merges(tmp_path, toy_tokenizer):
    """DoRA, rsLoRA and all-linear targets are peft's own LoraConfig fields; the export merges them to the same
    logits, and the module's hyper-parameters hold the complete settings as plain data."""
    spec = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": True, "use_rslora": True}
    module = CausalLMModule(model="toy:tiny", lora=spec)
    assert module.hparams["lora"] == {**spec, "lora_dropout": 0.0}
    trained = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trained) and any("mlp" in n for n in trained)
    _train_lora_b(module)
    reloaded = CausalLMModule(model=str(module.export(tmp_path / "merged")))
    assert torch.allclose(_logits(module, toy_tokenizer), _logits(reloaded, reloaded.tokenizer), atol=1e-4)


@pytest.mark.parametrize("spec, needle", [({"rank": 4}, "unknown key 'rank'"), ({"task_type": "SEQ_CLS"}, "CAUSAL_LM"),
                                          ({"r": 0}, ">= 1"), ({"alpha": 8, "lora_alpha": 8}, "keep one"),
                                          ({"r": 4, "target_modules": "no_such_module"}, "target_modules")])
def test_bad_lora_settings_are_one_line(spec, needle):
    from immunize.errors import UserError

    with pytest.raises(UserError, match=needle) as err:
        CausalLMModule(model="toy:tiny", lora=spec)
    assert "\n" not in str(err.value)


def test_short_names_of_earlier_configs_still_read():
    module = CausalLMModule(model="toy:tiny", lora={"r": 4, "alpha": 8, "dropout": 0.1})
    assert module.hparams["lora"]["lora_alpha"] == 8 and module.hparams["lora"]["lora_dropout"] == 0.1


def test_a_continued_adapter_trains_only_its_own_weights(tmp_path):
    import lightning as L

    from immunize.datamodules import SFTData, Source
    from immunize.lightning_modules import SFT

    module = CausalLMModule(model="toy:tiny", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                            export_lora="adapter")
    _train_lora_b(module)
    out = module.export(tmp_path / "aligned")
    sft = SFT(model=str(out), adapter="continue", lr=1e-2)
    before = {n: p.detach().clone() for n, p in sft.model.named_parameters()}
    data = SFTData(train=[Source(kind="alpaca", path=str(_alpaca_file(tmp_path)))], template="plain", batch_size=2)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(sft, datamodule=data)
    moved = {n for n, p in sft.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
