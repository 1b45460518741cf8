"""RefusalAblation end to end on a toy model that refuses: `fit` finds the direction, ablates it (the harmful prompts'
refusal score falls below 0) and the export is the ablated model with the direction and its layer beside it; the
shipped toy config runs through `immunize fit`; bad input is one line."""
import json

import lightning as L
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from immunize.datamodules import AlignmentData, RefusalDirectionData, SFTData, Source
from immunize.datamodules.collate import pad_left
from immunize.errors import UserError
from immunize.lightning_modules import SFT, RefusalAblation
from immunize.lightning_modules.functional.refusal_direction import refusal_score

from conftest import REPO

HARMFUL = Source(kind="toy", part="harmful", split="attack")
HARMLESS = Source(kind="toy", part="benign", split="finetune")


def trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory) -> str:
    """toy:tiny taught to refuse harmful requests and answer benign ones (60 steps, a few seconds)."""
    torch.manual_seed(0)
    module = SFT(model="toy:tiny", lr=3e-3)
    data = AlignmentData(pairs=Source(kind="toy", part="pairs", split="align", limit=200),
                         benign=Source(kind="toy", part="benign", split="align", limit=200), template="qa",
                         batch_size=16)
    trainer(max_steps=60).fit(module, datamodule=data)
    path = tmp_path_factory.mktemp("aligned") / "model"
    module.export(path)
    return str(path)


def prompts_data(**kw) -> RefusalDirectionData:
    return RefusalDirectionData(harmful=HARMFUL, harmless=HARMLESS, n_train=32, n_val=16, template="qa", **kw)


def harmful_scores(model, data, module) -> torch.Tensor:
    batch = pad_left(data.selection_prompts()["harmful"], module.tokenizer.pad_token_id)
    with torch.no_grad():
        return refusal_score(model(**batch).logits[:, -1], module.refusal_ids)


def test_a_fixed_layer_is_ablated_and_exported_with_its_direction(aligned, tmp_path):
    module = RefusalAblation(model=aligned, layer=1)
    data = prompts_data()
    data.connect(module.tokenizer)
    before = harmful_scores(module.model, data, module)
    assert before.mean() > 0  # the aligned model refuses
    trainer(max_epochs=1).fit(module, datamodule=data)
    info = module.direction_info
    assert (info["layer"], info["position"], info["selection"]) == (1, -1, "fixed")
    assert info["post_instruction_positions"] == 2 and info["refusal_tokens"]["text"] == ["i", "sorry"]
    assert info["prompts"]["harmful_train"] > 0 and info["prompts"]["harmless_train"] > 0
    after = harmful_scores(module.model, data, module)
    assert after.mean() < 0 < before.mean()  # refusal is gone
    assert info["scores"]["bypass"] == pytest.approx(after[:info["prompts"]["harmful_val"]].mean().item(), abs=0.5)

    out = tmp_path / "ablated"
    module.export(out)
    saved = json.loads((out / "refusal_direction.json").read_text())
    assert saved["layer"] == 1 and saved["position"] == -1 and len(saved["candidates"]) == 4
    with safe_open(str(out / "refusal_direction.safetensors"), "pt") as f:
        direction, candidates = f.get_tensor("direction"), f.get_tensor("candidates")
        assert f.metadata() == {"layer": "1", "position": "-1"}
    assert direction.dtype == torch.float64 and torch.equal(direction, candidates[-1, 1])
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = pad_left(data.selection_prompts()["harmful"], module.tokenizer.pad_token_id)
    module.model.eval()
    with torch.no_grad():
        ours = module.model(**batch, output_hidden_states=True)
        theirs = reloaded(**batch, output_hidden_states=True)
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
    r_hat = (direction / direction.norm()).float()
    assert all((h @ r_hat).abs().max() < 1e-4 for h in theirs.hidden_states[:-1])


def test_the_toy_attack_config_runs_through_immunize_fit(aligned, tmp_path, monkeypatch):
    from immunize.cli import main

    monkeypatch.chdir(tmp_path)  # LightningCLI writes its config.yaml into the working folder
    out = tmp_path / "ablated"
    main(["fit", "--config", str(REPO / "configs/attacks/refusal_ablation.yaml"), "--model.init_args.model", aligned,
          "--data.init_args.n_train", "32", "--data.init_args.n_val", "16", "--export_dir", str(out)])
    info = json.loads((out / "refusal_direction.json").read_text())
    assert info["selection"] in ("rule", "rule_fallback") and info["layer"] == 1
    assert (out / "stage.json").is_file() and (out / "model.safetensors").is_file()
    assert info["filter"] == {"prompts": True, "kl_threshold": 0.1, "induce_threshold": 0.0,
                              "prune_layer_fraction": 0.0}


def test_the_reference_rule_on_two_layers_filters_everything_unless_told_otherwise(aligned):
    module = RefusalAblation(model=aligned)  # int(0.8 * 2) = 1: only layer 0, whose difference is 0
    with pytest.raises(UserError, match="filtered out"):
        trainer(max_epochs=1).fit(module, datamodule=prompts_data())
    assert module.direction_info is None and module.needs_optimizer_steps


def test_bad_input_is_one_line(aligned):
    for kwargs, needle in (({"layer": 2}, "model.layer"), ({"position": -1}, "model.position"),
                           ({"layer": 0, "position": 0}, "model.position"), ({"lora": {"r": 4}}, "lora"),
                           ({"if_all_filtered": "skip"}, "if_all_filtered"), ({"refusal_tokens": ["zzqx"]}, "zzqx")):
        with pytest.raises(UserError, match=needle) as err:
            RefusalAblation(model=aligned, **kwargs)
        assert "\n" not in str(err.value)
    module = RefusalAblation(model=aligned, layer=1, position=-3)
    with pytest.raises(UserError, match="post-instruction positions"):
        trainer(max_epochs=1).fit(module, datamodule=prompts_data())
    with pytest.raises(UserError, match="RefusalDirectionData"):
        trainer(max_epochs=1).fit(RefusalAblation(model=aligned), datamodule=SFTData(train=[HARMFUL], template="qa"))
    with pytest.raises(UserError, match="distinct harmful prompts"):
        RefusalDirectionData(harmful=Source(kind="toy", part="harmful", split="attack", limit=10),
                             harmless=HARMLESS, n_train=8, n_val=4).prompts()
    with pytest.raises(UserError, match="exports the ablated model"):
        RefusalAblation(model=aligned).write_export_extras(None)
