"""Tiny Llama configurations for the toy world: small enough to train on two CPU cores."""
from __future__ import annotations

from transformers import LlamaConfig

from immunize.errors import UserError

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
    "base": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8),
}


def toy_config(name: str, tokenizer) -> LlamaConfig:
    """A LlamaConfig for preset `name` whose vocabulary and special ids match the toy tokenizer."""
    if name not in PRESETS:
        raise UserError(f"unknown toy preset {name!r}; choose from {sorted(PRESETS)} (as model: toy:<preset>)")
    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **PRESETS[name],
    )
