"""Lisa: the phase schedule, gradients by hand, LoRA anchors and warmup, resume."""
from __future__ import annotations

from pathlib import Path

import torch

# Shared test helpers of the Panacea tests (tests/ is on sys.path under pytest's default import mode);
from helpers.finetune import crash_and_resume, encoded, grads_at, Recorder, data, module, params_of, trainer

from immunize.callbacks import Lisa
from immunize.callbacks.lisa import ALIGNMENT, USER, lisa_phase
from immunize.callbacks.base import draw_indices
from immunize.datamodules import Source
from immunize.datamodules.collate import pad_right
from immunize.lightning_modules.functional.grad_math import masked_ce

REPO = Path(__file__).resolve().parents[1]
PAIRS = Source(kind="toy", part="pairs", split="align", limit=30)


# ----- Lisa ----------------------------------------------------------------------------------------
def test_lisa_phase_schedule_alternates():
    assert [lisa_phase(s, 2, 3) for s in range(11)] == [ALIGNMENT] * 2 + [USER] * 3 + [ALIGNMENT] * 2 + [USER] * 3 + [ALIGNMENT]
    assert {lisa_phase(s, 100, 900) for s in range(100)} == {ALIGNMENT}
    assert {lisa_phase(s, 100, 900) for s in range(100, 1000)} == {USER} and lisa_phase(1000, 100, 900) == ALIGNMENT
    assert {lisa_phase(s, 0, 4) for s in range(9)} == {USER} and {lisa_phase(s, 3, 0) for s in range(9)} == {ALIGNMENT}


def test_lisa_gradients_match_hand_computation(tmp_path, toy_tokenizer):
    """Steps A A U U A. Alignment step 1: grad f_align(w1; alignment draw 1) + rho (w1 - w0); user step 3:
    grad g(w3; user batch) + rho (w3 - w2): each anchored at the other phase's last weights."""
    rho, bs = 0.5, 3
    m, rec = module(optimizer="sgd", lr=0.05), Recorder()
    lisa = Lisa(alignment=PAIRS, rho=rho, alignment_steps=2, user_steps=2, batch_size=bs)
    trainer(tmp_path, [lisa, rec], max_steps=5).fit(m, data())
    assert len(rec.steps) == 5 and lisa.draws == 3

    rows = encoded(PAIRS, "refusal", toy_tokenizer)
    hand = [pad_right([rows[i] for i in draw_indices(len(rows), bs, d, 0, 1, 0)], toy_tokenizer.pad_token_id) for d in range(3)]
    for step, draw in ((0, 0), (1, 1), (4, 2)):  # alignment steps trained on the alignment batches, in draw order
        assert all(torch.equal(rec.steps[step]["batch"][k], hand[draw][k]) for k in hand[draw]), step
    for step in (2, 3):  # user steps: the user's batch (HarmfulMix, 4 rows), not an alignment batch (3 rows)
        assert rec.steps[step]["batch"]["input_ids"].shape[0] == 4

    def check(step: int, anchor_step: int) -> None:
        w, anchor = rec.steps[step]["before"], rec.steps[anchor_step]["before"]
        g = grads_at(w, rec.steps[step]["batch"])
        expected = {n: g[n] + rho * (w[n] - anchor[n]) for n in g}
        diff = max(float((rec.steps[step]["grad"][n] - e).abs().max()) for n, e in expected.items())
        prox = max(float((rho * (w[n] - anchor[n])).abs().max()) for n in g)
        assert diff < 1e-6, (step, diff)
        assert (prox == 0) if anchor_step == step else (prox > max(100 * diff, 1e-5)), (step, diff, prox)  # visible

    check(0, 0)  # first alignment step: anchored at the initial weights (proximal term 0)
    check(1, 0)  # alignment, anchor = initial weights (the "other state" before any user phase)
    check(2, 2)  # first user step: anchor = the weights the alignment phase ended with
    check(3, 2)
    check(4, 4)  # back to alignment: anchor = the weights the user phase ended with
    assert lisa.anchor_phase == ALIGNMENT and all(torch.equal(lisa.anchor[n], rec.steps[4]["before"][n]) for n in lisa.anchor)


def test_lisa_lora_anchor_and_warmup(tmp_path):
    """With LoRA only the adapters carry the anchor and the proximal gradient; proximal_warmup 0.5 of 4 steps
    leaves steps 0 and 1 without it (alignment step 1 gets the pure alignment gradient)."""
    m, rec = module(lora=True, optimizer="sgd", lr=0.05), Recorder()
    lisa = Lisa(alignment=PAIRS, rho=1.0, alignment_steps=2, user_steps=2, batch_size=3, proximal_warmup=0.5)
    trainer(tmp_path, [lisa, rec], max_steps=4).fit(m, data())
    assert lisa.anchor and all("lora_" in n for n in lisa.anchor)
    lora = [n for n in rec.steps[1]["grad"] if "lora_" in n]
    before = rec.steps[1]["before"]
    m2 = module(lora=True)
    with torch.no_grad():
        for n, p in m2.model.named_parameters():
            p.copy_(before[n])
    b = rec.steps[1]["batch"]
    params = [p for n, p in m2.model.named_parameters() if n in lora]
    g = torch.autograd.grad(masked_ce(m2.model(b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]), params)
    assert all(torch.allclose(rec.steps[1]["grad"][n], gi, atol=1e-7) for n, gi in zip(lora, g))
    assert lisa.last_drift is not None and lisa.last_drift > 0  # step 3 (past the warmup) had the proximal term


def test_lisa_resumed_fit_matches_uninterrupted(tmp_path):
    """Steps A U U A; checkpoint after step 1 (one batch per epoch), crash at step 3. The resumed step 2 must use the
    anchor taken at step 1 (restored from the checkpoint) and step 3 the next alignment draw."""
    (full, full_lisa), (resumed, res_lisa) = crash_and_resume(
        tmp_path, lambda: (module(), Lisa(alignment=PAIRS, rho=1.0, alignment_steps=1, user_steps=2, batch_size=4)))
    assert res_lisa.draws == full_lisa.draws == 2 and res_lisa.anchor_phase == full_lisa.anchor_phase == ALIGNMENT
    for n, p in params_of(full).items():
        assert torch.allclose(params_of(resumed)[n], p, atol=1e-5, rtol=0), n


