"""The hidden states of a causal LM cut after its first n decoder blocks, without running the blocks after them.

Circuit Breakers' reference loads its model with config.num_hidden_layers = max(target layers) + 1 and reads
`output_hidden_states` of that shortened network. `truncated_hidden_states` returns the same n + 1 tensors from the
whole model: the input of block 0 (the embeddings), the outputs of blocks 0 .. n-2, and the final norm applied to
the output of block n-1 (a shortened Hugging Face model ends with its final norm; final_norm=False keeps that
output as it is). Forward hooks record them and stop the forward after block n-1, so neither the later blocks nor
the LM head run.
"""
from __future__ import annotations

from torch import nn

from immunize.lightning_modules.modeling.hidden_hooks import decoder, decoder_layers, first_tensor, lens_modules


class _StopForward(Exception):
    """Raised by the hook on the last kept block: the rest of the forward is not needed."""


def truncated_hidden_states(model: nn.Module, part: dict, n_layers: int, final_norm: bool = True) -> list:
    """[embeddings, block outputs 0 .. n_layers-2, final_norm(block output n_layers-1)] of a batch part
    (input_ids, attention_mask), with the autograd graph of the current mode (see the module docstring)."""
    layers = decoder_layers(model)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"truncated_hidden_states: n_layers must be in 1..{len(layers)}, got {n_layers}")
    norm = lens_modules(model)[1] if final_norm else None
    states = []

    def record_input(module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def record_output(module, args, output):
        states.append(first_tensor(output))
        if len(states) == n_layers + 1:
            raise _StopForward

    handles = [layers[0].register_forward_pre_hook(record_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(record_output) for layer in layers[:n_layers]]
    try:
        decoder(model)(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if len(states) != n_layers + 1:
        raise RuntimeError(f"truncated_hidden_states recorded {len(states)} states, expected {n_layers + 1}")
    if final_norm:
        states[-1] = norm(states[-1])
    return states
