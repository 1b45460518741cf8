"""Log-likelihood multiple-choice scoring, the project's own (no lm-eval): the check on the lm-eval bridge.

Conditioning is lm-evaluation-harness's for a causal LM: the context is encoded with the tokenizer's special tokens
(BOS), the continuation is `delimiter + choice`, its tokens are those of encode(context + continuation) after the
context's tokens, and a choice's score is the sum of its continuation tokens' log-probabilities. The prediction is
the first choice of highest score (acc); acc_norm divides each score by the choice's length in characters first.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from immunize.errors import UserError


def _encode(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): trailing spaces of the context move to the continuation, and the
    continuation's ids are those of the whole string after the context's own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation).input_ids
    ctx = tokenizer(context).input_ids
    return ctx, whole[len(ctx):]


@torch.no_grad()
def choice_loglikelihoods(model, tokenizer, items: Sequence[dict], delimiter: str = " ") -> list[list[float]]:
    """Per item, the summed log-probability of each choice's continuation given the item's context.

    Args:
        model: a causal LM (its logits in fp32 for the log-softmax).
        tokenizer: its tokenizer.
        items: rows with "query" (the context) and "choices" (answer strings).
        delimiter: put between the context and each choice (lm-eval's target_delimiter).

    Returns:
        one list of floats (one per choice) per item.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for item in items:
        pairs = [_encode(tokenizer, item["query"], delimiter + c) for c in item["choices"]]
        if any(not cont for _, cont in pairs):
            raise UserError(f"multiple choice: a choice of {item.get('id', item['query'])!r} encodes to no tokens")
        seqs = [(ctx + cont)[:-1] for ctx, cont in pairs]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        scores = []
        for row, (ctx, cont) in enumerate(pairs):
            start = len(ctx) - 1  # the logits at position t predict token t + 1
            positions = torch.arange(start, start + len(cont), device=device)
            scores.append(float(logprobs[row, positions, torch.tensor(cont, device=device)].sum()))
        out.append(scores)
    return out


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice_accuracy(model, tokenizer, items: Sequence[dict], delimiter: str = " ",
                             normalize: bool = False) -> float:
    """Accuracy in percent: the share of items whose highest-scoring choice (choice_loglikelihoods) is the gold one.

    Args:
        model: a causal LM (left in the mode it is in: call model.eval() for dropout-free scores).
        tokenizer: its tokenizer.
        items: rows with "query", "choices" and "gold" (index of the right choice), e.g. the toy_mc.jsonl rows.
        delimiter: put between the context and each choice (lm-eval's target_delimiter).
        normalize: divide each choice's score by its length in characters first (lm-eval's acc_norm).
    """
    if not items:
        raise UserError("multiple choice: no items to score")
    lls = choice_loglikelihoods(model, tokenizer, items, delimiter)
    hits = 0
    for item, scores in zip(items, lls):
        if normalize:
            scores = [s / len(c) for s, c in zip(scores, item["choices"])]
        hits += _first_argmax(scores) == int(item["gold"])
    return 100.0 * hits / len(items)
