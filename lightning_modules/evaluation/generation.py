"""Batched greedy generation with a KV cache on left-padded prompts."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> list[str]:
    """Decode up to max_new_tokens per prompt; returns only the new text, stopped at EOS."""
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    new_tokens = out[:, input_ids.shape[1]:]
    return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
