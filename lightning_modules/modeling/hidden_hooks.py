"""Where a causal LM's hidden states live, and forward hooks that read or shift them (Vaccine, RepNoise).

Plain functions over a Hugging Face model (optionally wrapped by peft): the decoder's layer list,
submodules of each layer (e.g. every layer's `mlp`), the final norm and lm_head for the logit lens,
and two context managers: `capture_outputs` records each module's output tensor of the next
forward, `add_to_outputs` adds a fixed tensor to each module's output. A module whose forward
returns a tuple (HF attention: (output, weights)) is read and shifted on its first element.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from immunize.errors import UserError

LAYER_LIST_NAMES = ("layers", "h", "blocks")
NORM_NAMES = ("norm", "final_layernorm", "ln_f")


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model: nn.Module) -> nn.Module:
    base = unwrap(model)
    return base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in order (Llama/Mistral/Qwen `layers`, GPT-2 style `h`, ...)."""
    dec = decoder(model)
    for name in LAYER_LIST_NAMES:
        layers = getattr(dec, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    raise UserError(f"found no decoder layer list ({list(LAYER_LIST_NAMES)}) on {type(dec).__name__}; "
                    "hidden-state methods need a decoder-only transformer such as Llama")


def layer_submodules(model: nn.Module, name: Optional[str]) -> list[nn.Module]:
    """`getattr(layer, name)` for every decoder layer (the layers themselves when name is None)."""
    layers = decoder_layers(model)
    if name is None:
        return layers
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, name, None), nn.Module)]
    if missing:
        raise UserError(f"decoder layer {missing[0]} ({type(layers[missing[0]]).__name__}) has no submodule "
                        f"{name!r}; this method needs a Llama-style block")
    return [getattr(layer, name) for layer in layers]


def lens_modules(model: nn.Module):
    """(lm_head, final norm) of the underlying HF model, for the logit lens."""
    base, dec = unwrap(model), decoder(model)
    for name in NORM_NAMES:
        norm = getattr(dec, name, None)
        if norm is not None:
            return base.get_output_embeddings(), norm
    raise UserError(f"the logit lens needs the model's final norm; none of {list(NORM_NAMES)} found on "
                    f"{type(dec).__name__}; use a Llama-style model")


def first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _with_first(output, tensor: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return tensor
    return (tensor, *output[1:]) if isinstance(output, tuple) else type(output)((tensor, *output[1:]))


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[Optional[torch.Tensor]]]:
    """Yields a list that holds, after a forward inside the block, each module's output tensor (graph kept)."""
    captured: list[Optional[torch.Tensor]] = [None] * len(modules)

    def hook_for(i):
        def hook(module, args, output):
            captured[i] = first_tensor(output)
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add_to_outputs(modules: Sequence[nn.Module], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block, module i's output becomes output + deltas[i] (a constant: no gradient flows into it)."""
    if len(modules) != len(deltas):
        raise ValueError(f"add_to_outputs: {len(modules)} modules but {len(deltas)} deltas")

    def hook_for(delta):
        def hook(module, args, output):
            out = first_tensor(output)
            if out.shape != delta.shape:
                raise ValueError(f"add_to_outputs: output shape {tuple(out.shape)} != delta shape {tuple(delta.shape)}")
            return _with_first(output, out + delta.to(dtype=out.dtype, device=out.device))
        return hook

    handles = [m.register_forward_hook(hook_for(d.detach())) for m, d in zip(modules, deltas)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
