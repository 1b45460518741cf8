"""Export writes tensor by tensor: LoRA merged per layer equals peft's merge_and_unload, the live model keeps its
adapters, the weights carry the export dtype (config.json says it), and large models are sharded."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from immunize.errors import UserError
from immunize.lightning_modules import CausalLMModule
from immunize.lightning_modules.modeling.export_weights import weight_entries, write_weights

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _trained(module) -> None:
    """Adapter weights with values (B is zero at init), as after training."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in module.model.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _peft_merged(module) -> dict:
    merged = copy.deepcopy(module.model).merge_and_unload()
    return {k: v for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"use_rslora": True}])
def test_merged_export_equals_peft_merge_and_leaves_the_live_model_alone(tmp_path, extra):
    module = CausalLMModule(model="toy:tiny", lora={**LORA, **extra})
    _trained(module)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    expected = _peft_merged(module)
    out = module.export(tmp_path / "m")
    written = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in written)
    assert set(written) <= set(expected) and written
    for key, tensor in written.items():
        assert torch.allclose(tensor, expected[key], atol=1e-6), key
    changed = [k for k in written if "q_proj" in k or "v_proj" in k]
    base = CausalLMModule(model="toy:tiny").model.state_dict()
    assert changed and all(not torch.allclose(written[k], base[k]) for k in changed if k.endswith("weight"))
    after = module.model.state_dict()  # the live model: same keys (adapters still there), same values
    assert after.keys() == before.keys() and any("lora_A" in k for k in after)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert hasattr(module.model, "merge_and_unload")


def test_export_dtype_explicit_automatic_and_from_the_trainer(tmp_path):
    def dtypes(out):
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            kinds = {f.get_slice(k).get_dtype() for k in f.keys()}
        config = json.loads((out / "config.json").read_text())
        return kinds, config["dtype"], config["torch_dtype"]

    module = CausalLMModule(model="toy:tiny", lora=LORA)
    assert dtypes(module.export(tmp_path / "own")) == ({"F32"}, "float32", "float32")  # the weights' own
    module._trainer = SimpleNamespace(precision="bf16-mixed")
    assert dtypes(module.export(tmp_path / "bf16")) == ({"BF16"}, "bfloat16", "bfloat16")
    module.export_dtype = "float32"  # explicit wins over the trainer's precision
    assert dtypes(module.export(tmp_path / "f32")) == ({"F32"}, "float32", "float32")
    module._trainer = None
    module.export_dtype = "float16"
    out = module.export(tmp_path / "f16")
    assert dtypes(out) == ({"F16"}, "float16", "float16")
    reloaded = CausalLMModule(model=str(out), dtype="float16")
    ref = _peft_merged(module)
    got = reloaded.model.state_dict()
    assert all(torch.allclose(got[k].float(), ref[k].half().float()) for k in ref if k in got)


def test_bad_export_dtype_is_one_line():
    with pytest.raises(UserError, match="export_dtype must be one of float32, bfloat16, float16"):
        CausalLMModule(model="toy:tiny", export_dtype="fp8")


def test_shards_and_tied_weights_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    module = CausalLMModule(model="toy:tiny")
    entries = weight_entries(module.model, merge=True)
    names = [e[0] for e in entries]
    assert len(names) == len(set(names))
    files = write_weights(tmp_path, entries, torch.float32, max_shard_bytes=20_000)
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json"
    index = json.loads((tmp_path / files[-1]).read_text())
    assert sorted(index["weight_map"]) == sorted(names)
    module.model.config.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    live = module.model.state_dict()
    assert all(torch.equal(v, live[k]) for k, v in reloaded.state_dict().items())
