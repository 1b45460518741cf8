"""A model's weights written as safetensors one tensor at a time: LoRA merged per layer, cast to the export dtype.

The live model is never copied or changed. Each output tensor is made when it is written and freed after: a LoRA
layer's merged weight is W + its delta (peft's own per-layer `get_delta_weight`: scale * B @ A) computed from the
live tensors; a layer whose merge is more than that delta (DoRA and other variants, a LoRA bias) is merged on a copy
of that one layer. Peak extra memory is about one layer, where a deep copy of the model doubled it.
Tensors tied to an earlier one (tied input and output embeddings) are written once, as save_pretrained does; the
model's config (its dtype set to the export dtype) and generation config go beside them.
"""
from __future__ import annotations

import copy
import json
import struct
from pathlib import Path
from typing import Callable, Optional

import torch

from immunize.errors import UserError
from immunize.io import atomic_write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}
MAX_SHARD_BYTES = 50 * 1000 ** 3  # save_pretrained's default: one file up to 50 GB
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"

Entry = tuple[str, torch.Tensor, Callable[[], torch.Tensor]]  # (name, live tensor: shape and dtype, make the output)


def _peft_types():
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    return LoraLayer, ModulesToSaveWrapper


def supported(hf_model) -> bool:
    """Whether every peft wrapper inside the model is one this writer handles (LoRA layers with one active adapter,
    modules_to_save), on plain weights; otherwise the export goes through save_pretrained (peft's merge on a copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if getattr(hf_model, "hf_quantizer", None) is not None:
        return False  # quantized weights: transformers' own save_pretrained knows their format
    lora_layer, modules_to_save = _peft_types()
    for module in hf_model.modules():
        if isinstance(module, BaseTunerLayer) and not (isinstance(module, lora_layer) and len(module.active_adapters) == 1):
            return False
        if isinstance(module, AuxiliaryTrainingWrapper) and not isinstance(module, modules_to_save):
            return False
    return True


def _merged_weight(layer) -> torch.Tensor:
    """W + delta of a LoRA layer's active adapter, from the live tensors (a one-layer copy for variants)."""
    adapter = layer.active_adapters[0]
    weight = layer.get_base_layer().weight
    plain = adapter not in getattr(layer, "lora_variant", {}) and not getattr(layer, "lora_bias", {}).get(adapter) \
        and not getattr(layer, "use_dora", {}).get(adapter)
    with torch.no_grad():
        if plain:
            delta = layer.get_delta_weight(adapter)
            return (weight.float() + delta.float()).to(weight.dtype)
        single = copy.deepcopy(layer)  # this layer only: peft's own merge for DoRA and the other variants
        single.merge(adapter_names=[adapter])
        return single.get_base_layer().weight.detach()


def _merged_bias(layer) -> torch.Tensor:
    single = copy.deepcopy(layer)
    with torch.no_grad():
        single.merge(adapter_names=[layer.active_adapters[0]])
    return single.get_base_layer().bias.detach()


def weight_entries(hf_model, merge: bool) -> list[Entry]:
    """The exported tensors of a (peft-injected or plain) HF model, named as its unwrapped model names them: LoRA
    layers merged (merge) or their base weights (not merge); modules_to_save the trained copy (merge) or the
    original (not merge); adapter tensors left out; a tensor sharing storage with an earlier one left out."""
    lora_layer, modules_to_save = _peft_types()
    wrappers = {name: m for name, m in hf_model.named_modules() if isinstance(m, (lora_layer, modules_to_save))}
    entries: list[Entry] = []
    storages: set = set()
    for key, tensor in hf_model.state_dict().items():
        prefix = next((p for p in sorted(wrappers, key=len, reverse=True) if key.startswith(p + ".")), None)
        make: Callable[[], torch.Tensor] = (lambda t=tensor: t)
        name = key
        if prefix is not None:
            module, rest = wrappers[prefix], key[len(prefix) + 1:]
            if isinstance(module, lora_layer):
                if not rest.startswith("base_layer."):
                    continue  # lora_A/B, magnitudes: the adapter's own tensors
                name = f"{prefix}.{rest[len('base_layer.'):]}"
                lora_bias = getattr(module, "lora_bias", {}).get(module.active_adapters[0])
                if merge and rest == "base_layer.weight":
                    make = (lambda m=module: _merged_weight(m))
                elif merge and rest == "base_layer.bias" and lora_bias:
                    make = (lambda m=module: _merged_bias(m))
            else:
                keep = f"modules_to_save.{module.active_adapters[0]}." if merge else "original_module."
                if not rest.startswith(keep):
                    continue
                name = f"{prefix}.{rest[len(keep):]}"
        storage = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and storage in storages:
            continue  # tied to a tensor already written (its loader ties them again)
        storages.add(storage)
        entries.append((name, tensor, make))
    return entries


def _out_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.is_floating_point() else tensor.dtype


def _header(entries: list[Entry], dtype: torch.dtype) -> tuple[bytes, list[int]]:
    meta: dict = {"__metadata__": {"format": "pt"}}
    sizes, offset = [], 0
    for name, tensor, _ in entries:
        out = _out_dtype(tensor, dtype)
        if out not in SAFETENSORS_DTYPES:
            raise UserError(f"export: tensor {name!r} has dtype {out}, which safetensors export here does not write")
        size = tensor.numel() * torch.empty((), dtype=out).element_size()
        meta[name] = {"dtype": SAFETENSORS_DTYPES[out], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        sizes.append(size)
        offset += size
    header = json.dumps(meta, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
    return header, sizes


def _write_file(path: Path, entries: list[Entry], dtype: torch.dtype) -> None:
    header, sizes = _header(entries, dtype)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for (name, tensor, make), size in zip(entries, sizes):
            out = make().detach().to("cpu", _out_dtype(tensor, dtype)).contiguous()
            if tuple(out.shape) != tuple(tensor.shape):
                raise RuntimeError(f"export: {name} came out with shape {tuple(out.shape)}, not {tuple(tensor.shape)}")
            data = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else b""
            f.write(data if isinstance(data, bytes) else memoryview(data))
            del out, data


def write_weights(folder: Path, entries: list[Entry], dtype: torch.dtype, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors (or numbered shards plus model.safetensors.index.json beyond max_shard_bytes) in folder;
    returns the files written."""
    shards: list[list[Entry]] = [[]]
    total = used = 0
    for entry in entries:
        size = entry[1].numel() * torch.empty((), dtype=_out_dtype(entry[1], dtype)).element_size()
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
        total += size
    if len(shards) == 1:
        _write_file(folder / WEIGHTS, shards[0], dtype)
        return [WEIGHTS]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_file(folder / name, shard, dtype)
    weight_map = {entry[0]: name for name, shard in zip(names, shards) for entry in shard}
    atomic_write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [INDEX]


def write_config(folder: Path, hf_model, dtype: torch.dtype) -> None:
    """config.json with the export dtype (as dtype and torch_dtype), and generation_config.json when the model generates."""
    config = copy.deepcopy(hf_model.config)
    config.dtype = dtype
    config.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["torch_dtype"] = saved.get("dtype")  # the older name, for readers that know only it
    atomic_write_json(folder / "config.json", saved)
    generation = getattr(hf_model, "generation_config", None)
    if generation is not None and hf_model.can_generate():
        generation.save_pretrained(folder)
    if getattr(config, "auto_map", None):
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(hf_model, folder, config=config)


def resolve_dtype(export_dtype: Optional[str], precision: Optional[str], hf_model) -> torch.dtype:
    """The export dtype: the explicit one; else bfloat16 under a bf16 trainer precision; else the weights' own."""
    if export_dtype is not None:
        if export_dtype not in DTYPES:
            raise UserError(f"model.export_dtype must be one of {', '.join(DTYPES)} (null: automatic), got "
                            f"{export_dtype!r}")
        return DTYPES[export_dtype]
    if str(precision) in ("bf16-mixed", "bf16-true"):
        return torch.bfloat16
    return hf_model.dtype
