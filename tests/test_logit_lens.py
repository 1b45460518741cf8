"""The logit lens over all hidden states (SEAM's L_ul, RepNoise's H) against a manual loop."""

from __future__ import annotations


import torch
import torch.nn.functional as F

from lightning_modules.logit_lens import bounded_ascent, logit_lens_ce

from helpers.math import batch, tiny_llama


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
    got = logit_lens_ce(out.hidden_states, out.logits, labels, model.lm_head, model.model.norm)

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


