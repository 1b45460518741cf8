"""FSDP2 for every method: sharding a model, gradient passes on sharded parameters, reductions over shards.

Under Lightning's ModelParallelStrategy, `CausalLMModule.configure_model` calls `shard_model`: every decoder layer
becomes its own FSDP2 unit (`torch.distributed.fsdp.fully_shard`) and the whole model the root unit (embeddings,
final norm and head, tied or not). Parameters are then DTensors sharded on dim 0 across the data-parallel ranks.

What changes for the multi-pass methods, and where it is handled (so their own code stays the same):
- A gradient pass cannot use `torch.autograd.grad` on sharded parameters (the forward runs on all-gathered copies
  that FSDP frees again): `sharded_grads` runs `loss.backward()` and takes the reduce-scattered shard of each
  gradient from `p.grad` (already the mean over ranks, as a DDP all-reduce would give), leaving any gradient being
  accumulated in `p.grad` untouched. Every gradient, perturbation, backup and estimate built from these shards is a
  shard itself: about 1/N of the DDP memory per rank.
- Dot products and norms are full reductions: each rank's partial sum over its shards, summed over the ranks
  (`shard_sum`), so every rank gets the same scalar and takes the same perturbation step; replicated tensors are
  not summed twice. `all_reduce_mean_` leaves sharded tensors alone (they are rank means already).
- Weight perturbations add a shard to a shard and restore from a sharded fp32 backup: bit-exact as before.
- A retained graph cannot be backwarded twice (FSDP frees the gathered weights after the first backward); a
  method that needs two gradients of one forward runs the forward again when sharded (see SEAM).
- The head and final norm may be used directly on hidden states only inside a forward of the whole model: the
  root unit stays gathered from its forward until its backward (the logit lens relies on this).
- The root unit stays gathered after a forward until that forward's backward. A forward whose graph is dropped
  (a value only, a clamped loss) would leave it gathered, and the next forward would reuse those weights even
  after the optimizer or a perturbation changed them in place: `drop_gathered` (FSDP's public
  reset_iter_state) frees them; it runs at every training batch's start and after every in-place weight change.
- Export gathers the full state dict to rank 0 (`full_state_dict`) and saves an unsharded copy.
All parameters stay fp32 in the all-gather (no FSDP param_dtype): finite-difference steps of 1e-3 / |g| would round
away in bf16 weights. bf16 compute comes from the trainer's bf16-mixed autocast as without sharding.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch has no FSDP2
    DTensor = None  # type: ignore[assignment]


_ROOTS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # every root unit shard_model made


def is_sharded(t) -> bool:
    """Whether t is a DTensor (an FSDP2 shard of a parameter or of a gradient-shaped buffer)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    return any(is_sharded(t) for t in tensors)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t (t itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def shard_group(tensors: Sequence[torch.Tensor]):
    """The process group the sharded tensors are spread over (all share one 1-D mesh here)."""
    for t in tensors:
        if is_sharded(t):
            return t.device_mesh.get_group()
    return None


def shard_sum(partial: torch.Tensor, group) -> torch.Tensor:
    """Sum of every rank's `partial` (a scalar over this rank's shards) over `group`; in place, returned."""
    dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)
    return partial


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (LoRA-wrapped or not): the modules of the first ModuleList whose
    entries are all of one class named like *DecoderLayer / *Block (Llama, Mistral, Qwen, GPT-2, ...)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            names = {type(m).__name__ for m in module}
            if len(names) == 1 and next(iter(names)).endswith(("DecoderLayer", "Block")):
                return list(module)
    return []


def shard_model(model: nn.Module, mesh, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every decoder layer of `model`, then `model` itself (the root unit), over the 1-D `mesh`.

    Args:
        model: the HF model (or peft wrapper) to shard in place.
        mesh: a 1-D DeviceMesh of the data-parallel ranks (Lightning's device_mesh["data_parallel"] when
            tensor_parallel_size is 1, else the whole mesh is refused by the caller).
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3; False keeps them
            until the backward, ZeRO-2-like: more memory, one all-gather fewer per forward). The root unit
            (embeddings, final norm, head) always stays gathered from its forward to its backward: the logit lens
            applies the head and norm to hidden states after the model's forward.
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"found no decoder layers to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)  # the root stays gathered until its backward
    _ROOTS.add(model)
    return model


def drop_gathered() -> None:
    """Free the gathered weights of every FSDP root and reset FSDP's per-iteration state (see the module docstring).
    Only call it when no graph awaits its backward; a root that has not run a forward yet is left alone."""
    for root in list(_ROOTS):
        state = root._get_fsdp_state()
        if getattr(state, "_is_root", None):
            root.reset_iter_state()


def like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (the same whole tensor on every rank) as `param` holds it: this rank's shard when param is sharded."""
    if not is_sharded(param):
        return full.to(device=param.device, dtype=param.dtype)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=local(param).device, dtype=param.dtype), param.device_mesh,
                             param.placements, src_data_rank=None)


def sharded_grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params for FSDP2-sharded params, as shards (rank means), by one backward through FSDP's hooks.

    Gradients already accumulated in p.grad (earlier micro-batches) are set aside and put back unchanged.
    Parameters the loss does not reach get zero shards.
    """
    params = list(params)
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    finally:
        for p, g in zip(params, kept):
            p.grad = g
    return grads


def full_state_dict(model: nn.Module) -> Optional[dict]:
    """The model's full (unsharded) state dict on CPU on rank 0, None on the other ranks. A collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether `model` was sharded by shard_model (it is an FSDP2 module)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, FSDPModule)
