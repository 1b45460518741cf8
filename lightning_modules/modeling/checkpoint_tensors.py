"""Read a model's weights by name, one tensor at a time, without building the model.

A local model directory (or a hub id, fetched with huggingface_hub's snapshot_download: the safetensors files only)
whose weights are safetensors is read lazily: each tensor is read from its file when asked for (safetensors holds
no code, so reading runs none), and only the file headers are read up front. A source without safetensors (a GGUF
file, *.bin weights, a toy preset) is loaded whole through `load_model` (transformers, no remote code) and its
state dict is served instead; that holds the full model in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from immunize.errors import UserError
from immunize.lightning_modules.modeling.lora import saved_adapter
from immunize.lightning_modules.modeling.model_loading import TOY_PREFIX, _looks_local, load_model, load_tokenizer

INDEX_SUFFIX = ".safetensors.index.json"


def _snapshot(source: str, what: str) -> str:
    """The local folder of a hub id's safetensors files (and config), downloaded or from the cache."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, allow_patterns=["*.safetensors", f"*{INDEX_SUFFIX}", "config.json"])
    except Exception as err:  # the hub client raises many types for a missing repo or no network
        raise UserError(f"{what}: cannot fetch the hub model {source!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); give a local model directory") from err


def safetensors_map(folder: str) -> dict[str, str]:
    """{tensor name: file} of the safetensors weights at the top of `folder` (its index when there is one); {} when
    there are none."""
    root = Path(folder)
    indexes = sorted(root.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map") or {}
        return {name: str(root / file) for name, file in weight_map.items()}
    from safetensors import safe_open

    out: dict[str, str] = {}
    for path in sorted(root.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), str(path)))
    return out


class CheckpointTensors:
    """The tensors of one model source, by their names in the Hugging Face model (`model.layers.0.mlp.up_proj.weight`).

    Args:
        source: a local model directory, a hub id, or a toy preset (toy:<name>, a seeded random init).
        what: how errors name this source (e.g. "SafeLoRA: base_model").
        gguf_file: the GGUF file inside a `source` directory (then the model is loaded whole).
        tokenizer: the tokenizer a toy preset is built for (loaded from `source` when None).
    """

    def __init__(self, source: str, what: str, gguf_file: Optional[str] = None, tokenizer=None):
        self.source, self.what = source, what
        if not source.startswith(TOY_PREFIX) and _looks_local(source) and not os.path.isdir(source):
            raise UserError(f"{what}: model directory {source!r} does not exist; give the path of an exported model "
                            "or a hub id")
        if not source.startswith(TOY_PREFIX) and os.path.isdir(source) and saved_adapter(source) is not None:
            raise UserError(f"{what}: {source!r} keeps its LoRA adapter apart (export_lora: adapter); give a model "
                            "exported with the adapter merged (export_lora: merged)")
        self._files: dict[str, str] = {}
        self._state: Optional[dict[str, torch.Tensor]] = None
        if not gguf_file and not source.startswith(TOY_PREFIX):
            folder = source if os.path.isdir(source) else _snapshot(source, what)
            self._files = safetensors_map(folder)
        if not self._files:
            tok = tokenizer if tokenizer is not None else load_tokenizer(source, gguf_file)
            self._state = dict(load_model(source, tok, gguf_file=gguf_file).state_dict())

    def names(self) -> set[str]:
        return set(self._files) if self._state is None else set(self._state)

    def find(self, name: str, prefix: str = "") -> Optional[str]:
        """The stored name of tensor `name`: itself, or without / with the model's base-model `prefix` + "."
        (checkpoints saved from the bare transformer omit it); None when absent."""
        names = self.names()
        candidates = [name]
        if prefix:
            candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
        return next((c for c in candidates if c in names), None)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[name].shape)
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str, device=None) -> torch.Tensor:
        """The tensor, read now (lazily from its safetensors file), on `device`."""
        if self._state is not None:
            return self._state[name].to(device)
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name).to(device)
