"""FSDP2 (immunize.strategies.FSDP2: Lightning's ModelParallelStrategy + fully_shard) on 2 CPU processes with gloo,
against DDP on the same global batch, for every method: the full parameters after 5 SGD steps agree to 1e-5, both
ranks hold exactly the same full parameters, and each rank holds half of the gradient-sized buffers (the applied
gradient, and what a multi-pass step_gradient returns). Also: export gathers the full weights, and a
tensor-parallel mesh is refused in one line. SEAM (default suite) stands for the multi-pass methods; the rest are
`slow`.

SGD keeps the comparison linear in the gradient (see test_seam's DDP test). SEAM runs at its DDP test's lr 0.5.
Booster at 0.5 was chaotic over 5 steps (DDP and FSDP, whose reductions sum in different orders, parted by 4e-4;
at 0.05 by 6e-8), so every other method runs at 0.05, fixed before they were run.
"""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers.alignment import FSDP_STRATEGY, write_ddp_config
from immunize.lightning_modules import CausalLMModule

GRADIENT_BYTES = "tests.helpers.ranks.GradientBytes"


def _fit_both(tmp_path, cli, write):
    """Run the same fit under DDP and FSDP2; return {kind: ([rank0, rank1] parameter dicts, [rank0, rank1] bytes)}."""
    out = {}
    for kind, strategy in (("ddp", "ddp"), ("fsdp", FSDP_STRATEGY)):
        dump = tmp_path / kind
        path = write(dump, strategy, [{"class_path": GRADIENT_BYTES, "init_args": {"dirpath": str(dump)}}])
        result = cli("fit", "--config", str(path), timeout=400)
        assert result.returncode == 0, (kind, result.stderr[-3000:])
        params = [load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1)]
        sizes = [json.loads((dump / f"bytes{r}.json").read_text()) for r in (0, 1)]
        out[kind] = (params, sizes)
    return out


def _check(out):
    (ddp, ddp_bytes), (fsdp, fsdp_bytes) = out["ddp"], out["fsdp"]
    assert fsdp[0].keys() == ddp[0].keys() == fsdp[1].keys()
    assert all(torch.equal(fsdp[0][k], fsdp[1][k]) for k in fsdp[0]), "FSDP ranks disagree"
    assert all(torch.equal(ddp[0][k], ddp[1][k]) for k in ddp[0]), "DDP ranks disagree"
    diff = max(float((fsdp[0][k] - ddp[0][k]).abs().max()) for k in ddp[0])
    assert diff < 1e-5, diff
    for key in ("applied", "step_gradient"):  # step_gradient: multi-pass methods only
        for r in (0, 1):
            if key == "applied":
                assert ddp_bytes[r][key] > 0
            if ddp_bytes[r][key] == 0:
                continue
            share = fsdp_bytes[r][key] / ddp_bytes[r][key]
            assert 0.45 < share < 0.55, (key, r, share)
    return diff


def _alignment(method, init):
    def write(dump, strategy, callbacks):
        return write_ddp_config(dump.parent, method, init, 5, dump, strategy=strategy, callbacks=callbacks)
    return write


def _moved(params, module_init) -> float:
    start = {f"model.{n}": p.detach() for n, p in CausalLMModule(**module_init).model.named_parameters()}
    return max(float((params[k] - start[k]).abs().max()) for k in params)


SGD = {"model": "toy:tiny", "optimizer": "sgd", "scheduler": "cosine", "warmup_ratio": 0.2}


def test_seam_fsdp_equals_ddp_and_halves_gradient_buffers(tmp_path, cli):
    out = _fit_both(tmp_path, cli, _alignment("SEAM", {**SGD, "lr": 0.5}))
    _check(out)
    assert _moved(out["fsdp"][0][0], {"model": "toy:tiny"}) > 1e-2


@pytest.mark.slow
def test_booster_fsdp_equals_ddp_and_halves_gradient_buffers(tmp_path, cli):
    out = _fit_both(tmp_path, cli, _alignment("Booster", {**SGD, "lr": 0.05}))
    _check(out)
    assert _moved(out["fsdp"][0][0], {"model": "toy:tiny"}) > 1e-3


def _finetune(callback: dict):
    """An SFT fit on a 25%-harmful toy mix with a fine-tuning-stage defense callback."""
    from helpers.finetune import ATTACK, BENIGN

    def write(dump, strategy, callbacks):
        cfg = {
            "model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {**SGD, "lr": 0.05}},
            "data": {"class_path": "immunize.datamodules.HarmfulMix", "init_args": {
                "benign": vars(BENIGN), "harmful": vars(ATTACK), "n": 16, "p": 0.25, "batch_size": 4}},
            "trainer": {"max_steps": 5, "accelerator": "cpu", "devices": 2, "strategy": strategy, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                        "default_root_dir": str(dump / "root"), "callbacks": [
                            callback, {"class_path": "tests.helpers.ranks.DumpParameters", "init_args": {"dirpath": str(dump)}},
                            *callbacks]},
        }
        dump.mkdir(parents=True, exist_ok=True)
        path = dump / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path
    return write


@pytest.mark.slow
def test_panacea_fsdp_equals_ddp_with_identical_eps(tmp_path, cli):
    from helpers.finetune import H_SET

    out = _fit_both(tmp_path, cli, _finetune({"class_path": "immunize.callbacks.Panacea",
                                              "init_args": {"harmful": vars(H_SET), "harmful_batch_size": 4}}))
    _check(out)
    eps = {kind: load_file(str(tmp_path / kind / "root" / "panacea_eps.safetensors")) for kind in ("ddp", "fsdp")}
    assert eps["ddp"].keys() == eps["fsdp"].keys()
    assert max(float((eps["ddp"][k] - eps["fsdp"][k]).abs().max()) for k in eps["ddp"]) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", ["RepNoise", "Vaccine", "TAR", "TVaccine", "AdversarialImmunization"])
def test_every_other_alignment_method_fsdp_equals_ddp(tmp_path, cli, method):
    _check(_fit_both(tmp_path, cli, _alignment(method, {**SGD, "lr": 0.05})))


@pytest.mark.slow
@pytest.mark.parametrize("callback", ["immunize.callbacks.Lisa", "immunize.callbacks.Antidote", "immunize.callbacks.RandomPerturbation"])
def test_every_other_finetune_defense_fsdp_equals_ddp(tmp_path, cli, callback):
    _check(_fit_both(tmp_path, cli, _finetune({"class_path": callback})))


def test_fsdp_sft_exports_the_gathered_weights(tmp_path, cli):
    cfg = {
        "model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {**SGD, "lr": 0.05}},
        "data": {"class_path": "immunize.datamodules.SFTData", "init_args": {
            "batch_size": 4, "train": [{"kind": "toy", "part": "benign", "split": "pretrain", "limit": 32}]}},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 2, "strategy": FSDP_STRATEGY, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "callbacks": [{"class_path": "tests.helpers.ranks.DumpParameters",
                                   "init_args": {"dirpath": str(tmp_path / "dump")}}]},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("fit", "--config", "fit.yaml", "--export_dir", "model", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dumped = load_file(str(tmp_path / "dump" / "rank0.safetensors"))
    exported = CausalLMModule(model=str(tmp_path / "model"))
    names = dict(exported.model.named_parameters())
    assert {f"model.{n}" for n in names} == set(dumped)
    assert all(torch.equal(p, dumped[f"model.{n}"]) for n, p in names.items())
    assert _moved(dumped, {"model": "toy:tiny"}) > 1e-4


def test_tensor_parallel_mesh_is_one_line_error(tmp_path, cli):
    cfg = {"model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {"model": "toy:tiny"}},
           "data": {"class_path": "immunize.datamodules.SFTData", "init_args": {
               "batch_size": 4, "train": [{"kind": "toy", "part": "benign", "split": "pretrain", "limit": 8}]}},
           "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 2, "logger": False, "enable_checkpointing": False,
                       "strategy": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                    "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 2}}}}
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    result = cli("fit", "--config", "fit.yaml", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "tensor_parallel_size" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_lora_fsdp_export_equals_lora_ddp_export(tmp_path, cli):
    """LoRA adapters over a sharded base: the gathered, merged export equals DDP's merged export."""
    exports = {}
    for kind, strategy in (("ddp", "ddp"), ("fsdp", FSDP_STRATEGY)):
        cfg = {
            "model": {"class_path": "immunize.lightning_modules.SFT", "init_args": {
                **SGD, "lr": 0.05, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}},
            "data": {"class_path": "immunize.datamodules.SFTData", "init_args": {
                "batch_size": 4, "train": [{"kind": "toy", "part": "benign", "split": "pretrain", "limit": 32}]}},
            "trainer": {"max_steps": 3, "accelerator": "cpu", "devices": 2, "strategy": strategy, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False},
        }
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(cfg))
        result = cli("fit", "--config", f"{kind}.yaml", "--export_dir", f"model_{kind}", timeout=300)
        assert result.returncode == 0, (kind, result.stderr[-3000:])
        exports[kind] = load_file(str(tmp_path / f"model_{kind}" / "model.safetensors"))
    assert exports["ddp"].keys() == exports["fsdp"].keys()
    assert not any("lora" in k for k in exports["fsdp"])  # merged
    assert max(float((exports["ddp"][k] - exports["fsdp"][k]).abs().max()) for k in exports["ddp"]) < 1e-6
    base = {n: p.detach() for n, p in CausalLMModule(model="toy:tiny").model.named_parameters()}
    assert max(float((exports["fsdp"][n] - base[n]).abs().max()) for n in base if "q_proj" in n) > 1e-5
