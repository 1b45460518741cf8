"""Tokenization with response-only labels, padding (right for training, left for generation), and which positions a
batch's loss covers."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from immunize.datamodules.templates import format_prompt
from immunize.errors import UserError

IGNORE = -100
# Which positions a training loss covers: the response (ours), the whole sequence without padding (SEAM's reference
# benign gradient), or every position, padding included (the reference attacks' Hugging Face collator).
LOSS_ON = ("response", "sequence", "all")


def encode_prompt(tokenizer, template: str, prompt: str, system: Optional[str] = None) -> list[int]:
    """Token ids of the templated prompt (under `system`, if given), with the tokenizer's own special tokens (BOS)."""
    text = format_prompt(template, prompt, tokenizer, system)
    return tokenizer(text, add_special_tokens=template != "chat").input_ids


def encode_example(tokenizer, template: str, prompt: str, response: str, max_length: int,
                   system: Optional[str] = None) -> dict:
    """input_ids = prompt + response + EOS; labels mask the prompt (-100) so the loss is on the response."""
    prompt_ids = encode_prompt(tokenizer, template, prompt, system)
    response_ids = tokenizer(" " + response.strip(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def pad_right(rows: Sequence[dict], pad_id: int) -> dict:
    """Stack encoded examples; padding gets attention 0 and label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> dict:
    """Left-padded prompt batch for batched generation (new tokens start at the same column)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def checked_loss_on(loss_on: str) -> str:
    """loss_on itself, or a UserError naming the choices."""
    if loss_on not in LOSS_ON:
        raise UserError(f"data.loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    return loss_on


def supervise(batch: dict, loss_on: str) -> dict:
    """The batch with its labels set for `loss_on` (LOSS_ON): "response" keeps them; "sequence" labels every
    non-padding token (prompt included); "all" labels every position, padding included."""
    if loss_on == "response":
        return batch
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    ids = batch["input_ids"]
    labels = ids.clone() if loss_on == "all" else ids.masked_fill(batch["attention_mask"] == 0, IGNORE)
    return {**batch, "labels": labels}
