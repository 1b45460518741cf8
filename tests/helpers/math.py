"""Math test helpers: a tiny random Llama (eager attention, for double backward) and random response-only batches."""

from __future__ import annotations


import torch
from transformers import LlamaConfig, LlamaForCausalLM

from immunize.lightning_modules.functional.grad_math import dot, global_norm, masked_ce

VOCAB = 64


def tiny_llama(dtype=torch.float32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """Tiny random Llama; eager attention because SDPA kernels have no double backward."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def batch(seed: int, prompt_len: int = 4):
    """Random tokens with response-only labels (prompt positions are -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def loss_fns(model):
    (xa, ya), (xb, yb) = batch(1), batch(2)
    return (lambda: masked_ce(model(input_ids=xa).logits, ya)), (lambda: masked_ce(model(input_ids=xb).logits, yb))


def rel_err(est, ref) -> float:
    return float(global_norm([e - r for e, r in zip(est, ref)]) / global_norm(ref))


def cosine(a, b) -> float:
    return float(dot(a, b) / (global_norm(a) * global_norm(b)))


def naive_logit_lens(hidden_states, final_logits, labels, lm_head, final_norm):
    """The logit lens the obvious way (full [B, T, V] logits per hidden state, masked CE): the reference the
    supervised-row, chunked implementation must equal."""
    terms = [masked_ce(lm_head(final_norm(h)), labels) for h in hidden_states[:-1]]
    terms.append(masked_ce(final_logits, labels))
    return torch.stack(terms).mean()
