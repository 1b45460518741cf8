"""Plain tensor code shared by the conformance tests: the reference's way of computing a CE, a forward, global norms.
Never the project's helpers: a conformance test recomputes the quantity under test without them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(model, part, **kw):
    """The model's forward on one batch part (input ids and attention mask, no KV cache); `kw` go to the model."""
    return model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False, **kw)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over positions whose next label is not -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def ce(model, part) -> torch.Tensor:
    """token_ce of the model's logits on a batch part, against the part's labels."""
    return token_ce(forward(model, part).logits, part["labels"])


def causal_lm_ce(model, batch) -> torch.Tensor:
    """Token-mean next-token cross-entropy over labels != -100 (Hugging Face's causal-LM loss), from float32 logits
    through an explicit log-softmax and gather."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    mask = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum() / mask.sum()


def gnorm(ts) -> torch.Tensor:
    """One L2 norm over all tensors, in their own dtype."""
    return torch.sqrt(sum((t ** 2).sum() for t in ts))


def rel(a, b) -> float:
    """|a - b| / |b|, one L2 norm over all tensors."""
    return float(gnorm([x - y for x, y in zip(a, b)]) / gnorm(b))


def gnorm64(ts) -> torch.Tensor:
    """One L2 norm over all tensors, each cast to float64 first."""
    return torch.sqrt(sum((t.double() ** 2).sum() for t in ts))


def rel64(a, b) -> float:
    """|a - b| / |b| with one L2 norm over all tensors, in float64 (both sides cast before the difference)."""
    return float(gnorm64([x.double() - y.double() for x, y in zip(a, b)]) / gnorm64(b))


def first(output):
    """The hidden-state tensor of a module's output: the output itself, or its first element."""
    return output if isinstance(output, torch.Tensor) else output[0]


def assert_update_is_sgd_step(update, grad, lr: float, tol: float = 1e-5) -> list:
    """The update equals -lr * grad: same shapes, global relative norm of the difference <= tol, and every tensor
    close. Returns the expected update."""
    expected = [-lr * g for g in grad]
    assert len(update) == len(expected) and all(u.shape == e.shape for u, e in zip(update, expected))
    assert rel(update, expected) <= tol, rel(update, expected)
    assert all(torch.allclose(u, e, rtol=1e-4, atol=1e-10) for u, e in zip(update, expected))
    return expected
