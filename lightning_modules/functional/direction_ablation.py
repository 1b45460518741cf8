"""Refusal-direction ablation on a model: the reference's hooks, its weight orthogonalisation and its candidate scores
(andyrdt/refusal_direction pipeline/utils/hook_utils.py, submodules/select_direction.py, model_utils/*_model.py).

- `ablate_direction(model, r)`: inside the block, every decoder layer's input and every attention and MLP output
  loses its component along r_hat, at every position (the bypass intervention).
- `add_to_layer_input(model, layer, r)`: inside the block, r is added to the input of one decoder layer (the induce
  intervention, coefficient 1).
- `orthogonalize_model(model, r)`: the permanent ablation: W <- W - r_hat r_hat^T W on the d_model side of every
  writer to the residual stream (token embedding rows, each attention o_proj and MLP down_proj, and their biases);
  lm_head, q/k/v and gate/up are untouched (a tied lm_head is untied first, so it stays as it was).
- `candidate_scores(...)`: for each (position, layer) candidate: the bypass score (mean refusal score of the harmful
  prompts under ablation), the induce score (mean refusal score of the harmless prompts with r added at its layer)
  and the KL of the harmless prompts' last-position distribution under ablation.
Llama-style blocks (self_attn.o_proj, mlp.down_proj), as the reference's models.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from immunize.errors import UserError
from immunize.lightning_modules.functional.refusal_direction import (discard_reason, kl_divergence,
                                                                     orthogonalize_output, project_out, refusal_score,
                                                                     unit)
from immunize.lightning_modules.modeling.hidden_hooks import decoder_layers, layer_submodules, unwrap


def _replace_first(output, tensor: torch.Tensor):
    return tensor if isinstance(output, torch.Tensor) else (tensor, *output[1:])


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _layer_input_hook(change):
    """A forward pre-hook (with kwargs) that replaces a decoder layer's hidden-states input x by change(x)."""
    def hook(module, args, kwargs):
        if args:
            return (change(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
    return hook


@contextmanager
def _hooks(registrations) -> Iterator[None]:
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def ablate_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Inside the block, the direction is projected out of every decoder layer's input and every attention and MLP
    output (all positions)."""
    r_hat = unit(direction.detach())

    def drop(x: torch.Tensor) -> torch.Tensor:
        return project_out(x, r_hat)

    def post(module, args, output):
        return _replace_first(output, drop(_first(output)))

    pre = _layer_input_hook(drop)
    registrations = [lambda m=m: m.register_forward_pre_hook(pre, with_kwargs=True) for m in decoder_layers(model)]
    registrations += [lambda m=m: m.register_forward_hook(post)
                      for m in layer_submodules(model, "self_attn") + layer_submodules(model, "mlp")]
    with _hooks(registrations):
        yield


@contextmanager
def add_to_layer_input(model: nn.Module, layer: int, vector: torch.Tensor) -> Iterator[None]:
    """Inside the block, `vector` is added to decoder layer `layer`'s input at every position."""
    vector = vector.detach()
    hook = _layer_input_hook(lambda x: x + vector.to(device=x.device, dtype=x.dtype))
    module = decoder_layers(model)[layer]
    with _hooks([lambda: module.register_forward_pre_hook(hook, with_kwargs=True)]):
        yield


def residual_writers(model: nn.Module) -> list[nn.Module]:
    """The modules that write to the residual stream: the token embedding, then each layer's o_proj and down_proj."""
    writers = [unwrap(model).get_input_embeddings()]
    for part, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        for i, module in enumerate(layer_submodules(model, part)):
            linear = getattr(module, name, None)
            if not isinstance(linear, nn.Linear):
                raise UserError(f"decoder layer {i}: {part} has no nn.Linear {name!r}; refusal-direction ablation "
                                "orthogonalises Llama-style blocks (self_attn.o_proj, mlp.down_proj)")
            writers.append(linear)
    return writers


def untie_output_embeddings(model: nn.Module) -> bool:
    """Give a tied lm_head its own copy of the embedding matrix (and config.tie_word_embeddings False), so a change
    to the embedding leaves it as it was; True when it was tied."""
    base = unwrap(model)
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    base.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def orthogonalize_model(model: nn.Module, direction: torch.Tensor) -> None:
    """The permanent ablation (see the module docstring), in place."""
    r_hat = unit(direction.detach())
    untie_output_embeddings(model)
    embed, *linears = residual_writers(model)
    embed.weight.copy_(orthogonalize_output(embed.weight, r_hat, d_model_last=True))
    for linear in linears:
        linear.weight.copy_(orthogonalize_output(linear.weight, r_hat, d_model_last=False))
        if linear.bias is not None:
            linear.bias.copy_(orthogonalize_output(linear.bias, r_hat, d_model_last=True))


@torch.no_grad()
def last_logits(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """The last position's logits of every prompt of the (left-padded) batches, in order."""
    return torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, -1]
                      for b in batches])


def candidate_scores(model: nn.Module, candidates: torch.Tensor, harmful: Sequence[dict], harmless: Sequence[dict],
                     token_ids: Sequence[int], cells: Optional[Sequence[tuple[int, int]]] = None,
                     kl_threshold: Optional[float] = 0.1, induce_threshold: Optional[float] = 0.0,
                     prune_fraction: Optional[float] = 0.2) -> list[dict]:
    """One row per candidate of `candidates` [n_pos, n_layers, d_model] (positions -n_pos..-1): position, layer,
    bypass, induce, kl and `discarded` (the reference's filter; None: kept). `cells` lists the (position, layer)
    pairs to score; by default every candidate the layer rule keeps (the reference scores the late layers too, and
    then drops them whatever their scores). Candidates not scored have NaN scores; so has a zero candidate (the
    same token at the same layer 0 position on both sides), discarded as "zero" (the reference's hooks leave the
    model unchanged then, and its induce score fails the filter)."""
    n_pos, n_layers, _ = candidates.shape
    wanted = set(cells) if cells is not None else None
    baseline = last_logits(model, harmless)
    rows = []
    for pos in range(-n_pos, 0):
        for layer in range(n_layers):
            row = {"position": pos, "layer": layer, "bypass": float("nan"), "induce": float("nan"),
                   "kl": float("nan")}
            late = prune_fraction is not None and layer >= int(n_layers * (1.0 - prune_fraction))
            if (pos, layer) not in wanted if wanted is not None else late:
                rows.append({**row, "discarded": "late_layer" if wanted is None else "not_scored"})
                continue
            r = candidates[pos, layer]
            if not torch.isfinite(r).all() or r.norm() == 0:  # the reference's hooks then change nothing
                rows.append({**row, "discarded": "nan" if not torch.isfinite(r).all() else "zero"})
                continue
            with ablate_direction(model, r):
                row["kl"] = kl_divergence(baseline, last_logits(model, harmless)).mean().item()
                row["bypass"] = refusal_score(last_logits(model, harmful), token_ids).mean().item()
            with add_to_layer_input(model, layer, r):
                row["induce"] = refusal_score(last_logits(model, harmless), token_ids).mean().item()
            row["discarded"] = discard_reason(row["bypass"], row["induce"], row["kl"], layer, n_layers, kl_threshold,
                                              induce_threshold, prune_fraction)
            rows.append(row)
    return rows
