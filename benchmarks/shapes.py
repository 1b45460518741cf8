"""Model shapes, written once for every benchmark script: the published configs of the models the scripts size
(random weights are built from them: cost and memory do not depend on the weights), and ModelShape, a Llama-style
decoder's sizes with the parameter counts derived from them (flop_floor, memory and step_cost read these).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

# A ~0.5B-parameter Llama (random init, untied embeddings) for the GPU run of step_cost.
LLAMA_05B = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=20,
                 num_attention_heads=20, num_key_value_heads=20, max_position_embeddings=512, tie_word_embeddings=False)
# Real models' shapes (their published config.json); "llama-tiny" is memory.py's validation model: a random Llama of
# 7.1M parameters whose vocabulary / width ratio (32) is Llama 3's, GQA, untied.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5),
    "llama-0.5b": LLAMA_05B,
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-tiny": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False),
}

# Hub ids whose published config is one of SHAPES (immunize bench --plan sizes a hub model without downloading it).
HUB_SHAPES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m", "HuggingFaceTB/SmolLM2-135M": "smollm2-135m",
    "meta-llama/Llama-2-7b-hf": "llama2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama2-7b",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama3-8b",
    "meta-llama/Llama-3.1-8B": "llama3-8b", "meta-llama/Llama-3.1-8B-Instruct": "llama3-8b",
    "meta-llama/Meta-Llama-3-70B-Instruct": "llama3-70b", "meta-llama/Llama-3.1-70B-Instruct": "llama3-70b",
}

@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's shapes (no biases: Llama, Mistral, Qwen-style configs without attention bias).

    Args:
        vocab, hidden, intermediate, layers, heads, kv_heads: the config's sizes.
        head_dim: per-head width (the config's head_dim, else hidden // heads).
        tied: the head shares the embedding matrix.
    """

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @staticmethod
    def sizes(config: Union[dict, Any]) -> dict:
        """ModelShape's fields from a Hugging Face config (a dict or a config object)."""
        c = config if isinstance(config, dict) else config.to_dict()
        heads = c["num_attention_heads"]
        return dict(vocab=c["vocab_size"], hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                    layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                    head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                    tied=bool(c.get("tie_word_embeddings", False)))

    @classmethod
    def of(cls, config: Union[dict, Any]) -> "ModelShape":
        """From a Hugging Face config (vocab_size, hidden_size, ..., tie_word_embeddings)."""
        return cls(**cls.sizes(config))

    @property
    def kv(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.kv_heads * self.head_dim

    def linear_params(self) -> int:
        """One decoder layer's linear weights: q, k, v, o, gate, up, down."""
        q = self.heads * self.head_dim
        return self.hidden * (2 * q + 2 * self.kv) + 3 * self.hidden * self.intermediate

    def layer_params(self) -> int:
        """One decoder layer: its linear weights and the two RMSNorm weights."""
        return self.linear_params() + 2 * self.hidden

    def root_params(self) -> int:
        """Outside the decoder layers: embeddings, final norm and (untied) head: FSDP2's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def largest_tensor(self) -> int:
        """Elements of the largest weight matrix (the embedding or an MLP projection)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)
