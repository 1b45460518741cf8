"""The logit lens over all hidden states (SEAM's L_ul, RepNoise's H) against a manual loop."""

from __future__ import annotations


import torch
import torch.nn.functional as F

import pytest

from immunize.lightning_modules.functional.grad_math import masked_ce
from immunize.lightning_modules.functional.logit_lens import bounded_ascent, logit_lens_ce
from immunize.lightning_modules.functional.supervised_ce import chunked_head_ce_sum, response_ce, supervised_ce, supervised_rows

from helpers.math import batch, naive_logit_lens, tiny_llama


def _forward_capturing_layers(model, ids):
    """The model's output (with hidden states) and each decoder layer's raw output, captured by forward hooks."""
    captured = []
    hooks = [layer.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
             for layer in model.model.layers]
    try:
        out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out, captured


def test_hidden_states_layout_last_is_post_norm():
    """transformers 5.x: embedding + layers 1..L-1 (pre-norm) and, last, the final output AFTER model.norm."""
    model = tiny_llama(layers=3)
    ids, _ = batch(0)
    out, captured = _forward_capturing_layers(model, ids)
    hs = out.hidden_states
    assert len(hs) == 3 + 1
    assert torch.equal(hs[0], model.model.embed_tokens(ids))
    for k in range(1, 3):
        assert torch.allclose(hs[k], captured[k - 1])
    assert torch.allclose(hs[-1], model.model.norm(captured[-1]), atol=1e-6)
    assert torch.allclose(model.lm_head(hs[-1]), out.logits, atol=1e-6)
    assert not torch.allclose(model.lm_head(model.model.norm(hs[-1])), out.logits, atol=1e-5)  # no 2nd norm


def test_logit_lens_ce_matches_manual_loop():
    model = tiny_llama(layers=3)
    ids, labels = batch(3)
    out, captured = _forward_capturing_layers(model, ids)
    got = logit_lens_ce(out.hidden_states, labels, model.lm_head, model.model.norm)

    # Independent: normalise the embedding and every raw layer output once, project, CE by hand.
    states = [model.model.embed_tokens(ids)] + captured
    active = labels[:, 1:] != -100
    ces = []
    for h in states:
        logp = F.log_softmax(model.lm_head(model.model.norm(h))[:, :-1], -1)
        nll = -logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ces.append(nll[active].mean())
    expected = torch.stack(ces).sum() / len(states)  # L + 1 terms, honest mean
    assert len(states) == len(out.hidden_states) == 4
    assert torch.allclose(got, expected, rtol=1e-5)
    assert torch.allclose(bounded_ascent(got), -torch.log(1 + expected), rtol=1e-5)
    got.backward()  # differentiable end to end
    assert model.model.embed_tokens.weight.grad is not None




def _ragged_labels(ids):
    """Response-only labels with a different prompt length per row and right padding (both masked)."""
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, :6] = -100
    labels[1, 10:] = -100  # padding
    return labels


def test_supervised_rows_are_the_positions_masked_ce_counts():
    ids, _ = batch(0)
    labels = _ragged_labels(ids)
    rows, targets = supervised_rows(labels)
    assert rows.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10] + [12 + t for t in (5, 6, 7, 8)]
    assert targets.tolist() == labels[0, 3:].tolist() + labels[1, 6:10].tolist()


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_chunked_lens_value_and_gradient_equal_the_full_logit_lens(chunk_rows):
    """fp64, ragged labels: L_ul's value and its gradient w.r.t. every parameter equal the naive lens's, for a chunk
    size of one row, one that does not divide the rows, and one chunk."""
    model = tiny_llama(layers=3).double()
    ids, _ = batch(5)
    labels = _ragged_labels(ids)
    params = [p for p in model.parameters()]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    out = model(input_ids=ids, output_hidden_states=True)
    want = bounded_ascent(naive_logit_lens(out.hidden_states, out.logits, labels, model.lm_head, model.model.norm))
    want_grads = grads(want)
    hs = model.model(input_ids=ids, output_hidden_states=True).hidden_states
    got = bounded_ascent(logit_lens_ce(hs, labels, model.lm_head, model.model.norm, chunk_rows=chunk_rows))
    got_grads = grads(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_chunked_head_with_tied_embeddings_and_a_frozen_head():
    """Tied head: the head's gradient lands on the embedding matrix; a frozen head gets none, inputs still do."""
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (7,))
    head = torch.nn.Linear(5, 11, bias=False).double()
    for frozen in (False, True):
        head.weight.requires_grad_(not frozen)
        got = chunked_head_ce_sum(x, y, head, chunk_rows=3)
        want = torch.nn.functional.cross_entropy(head(x), y, reduction="sum")
        torch.testing.assert_close(got, want)
        inputs = [x] if frozen else [x, head.weight]
        for g, w in zip(torch.autograd.grad(2.5 * got, inputs), torch.autograd.grad(2.5 * want, inputs)):
            torch.testing.assert_close(g, w)


def test_supervised_ce_and_response_ce_equal_masked_ce_on_full_logits():
    model = tiny_llama(layers=2)
    ids, _ = batch(1)
    labels = _ragged_labels(ids)
    full = masked_ce(model(input_ids=ids).logits, labels)
    hidden = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(supervised_ce(hidden, labels, model.lm_head), full)
    part = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.testing.assert_close(response_ce(model, part), full)
    empty = torch.full_like(labels, -100)
    assert float(supervised_ce(hidden, empty, model.lm_head).detach()) == 0.0
