"""Write a tiny random Llama as an F32 llama.cpp-style GGUF, for offline GGUF loading tests.

The file follows llama.cpp's `convert_hf_to_gguf.py` conventions: llama metadata keys, a
sentencepiece ("llama") tokenizer section, `blk.N.*` tensor names and q/k rows permuted for rope.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Union

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# gguf token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

SPECIALS = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<pad>", CONTROL)]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# single pieces first, then merged pieces; every merged piece splits into two pieces listed before it
PIECES = ["\u2581", *string.ascii_lowercase, "\u2581t", "he", "\u2581the", "\u2581a", "in", "\u2581in", "at", "\u2581c", "\u2581cat"]

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN, CONTEXT = 64, 4, 2, 2, 128, 128
ROPE_THETA, RMS_EPS = 10000.0, 1e-5


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """`(tokens, scores, token_types)`: specials, byte-fallback tokens, then a few sentencepiece pieces."""
    tokens = [t for t, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [k for _, k in SPECIALS] + [BYTE] * 256 + [NORMAL] * len(PIECES)
    # sentencepiece scores: higher merges first; specials and bytes score 0 like llama.cpp writes them
    scores = [0.0] * (len(SPECIALS) + 256) + [-float(i) for i in range(len(PIECES))]
    return tokens, scores, types


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A random fp32 Llama with O(1) logits and non-trivial norm weights, untied lm_head, GQA."""
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else noise / p.shape[-1] ** 0.5)
    return model


def permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half layout -> interleaved pairs per head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp tensor names, q/k permuted, as contiguous fp32 arrays."""
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    leaves = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in leaves.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = permute_for_rope(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = permute_for_rope(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def write_tiny_llama_gguf(path: Union[str, os.PathLike], seed: int = 0) -> tuple[LlamaForCausalLM, Path]:
    """Write a tiny random Llama (weights + tokenizer) to `path` as an F32 GGUF; return (reference model, path)."""
    import gguf

    path = Path(path)
    tokens, scores, types = tiny_vocab()
    model = tiny_llama(len(tokens), seed)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")  # writes general.architecture itself
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path
