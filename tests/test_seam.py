"""SEAM LightningModule: the update is the documented gradient, estimators agree, precision trap, ablations, DDP."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers.ranks import assert_ranks_identical
from helpers.alignment import Capture, cosine, fit, params_of, rel_err, write_ddp_config
from helpers.math import naive_logit_lens
from immunize.errors import UserError
from immunize.lightning_modules import SEAM
from immunize.lightning_modules.functional.grad_math import global_norm, grads_of, masked_ce
from immunize.lightning_modules.functional.hessian_free import finite_difference_sd_grad
from immunize.lightning_modules.functional.logit_lens import bounded_ascent

def by_hand(model, batch, alpha, beta, eps):
    """grad L_ul + alpha grad L_up + beta * est, straight from the plain functions (single process)."""
    params = [p for p in model.parameters() if p.requires_grad]
    harmful, refusal, benign = batch["harmful"], batch["refusal"], batch["benign"]

    def ce(part):
        return masked_ce(model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits, part["labels"])

    out = model(input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True)
    lens = naive_logit_lens(out.hidden_states, out.logits, harmful["labels"], model.lm_head, model.model.norm)
    g_ul = grads_of(bounded_ascent(lens), params)
    g_up = grads_of(ce(refusal), params)
    g_a, g_b = grads_of(ce(harmful), params), grads_of(ce(benign), params)
    est, _ = finite_difference_sd_grad(params, lambda: grads_of(ce(harmful), params),
                                       lambda: grads_of(ce(benign), params), g_a, g_b, eps)
    return [u + alpha * r + beta * e for u, r, e in zip(g_ul, g_up, est)]


def test_applied_gradient_is_ul_plus_alpha_up_plus_beta_estimate():
    """With accumulate=2 the step applies the mean of two such gradients, taken at the same weights."""
    module = SEAM(model="toy:tiny", alpha=0.7, beta=0.5, eps=1e-3, accumulate=2, optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    assert len(capture.batches) == 2 and len(capture.grads) == 1
    parts = [by_hand(reference, b, 0.7, 0.5, 1e-3) for b in capture.batches]
    expected = [(x + y) / 2 for x, y in zip(*parts)]
    assert rel_err(capture.grads[0], expected) < 1e-5


def test_benign_tokens_sequence_takes_g_b_over_the_whole_benign_text():
    """The reference's g_b: the CE of the benign prompt and answer (padding left out), recomputed by hand."""
    module = SEAM(model="toy:tiny", alpha=0.7, beta=0.5, eps=1e-3, benign_tokens="sequence", optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    batch = copy.deepcopy(capture.batches[0])
    benign = batch["benign"]
    answer_only = (benign["labels"] != -100).sum()
    benign["labels"] = benign["input_ids"].masked_fill(benign["attention_mask"] == 0, -100)
    assert (benign["labels"] != -100).sum() > answer_only
    assert rel_err(capture.grads[0], by_hand(reference, batch, 0.7, 0.5, 1e-3)) < 1e-5
    with pytest.raises(UserError, match="benign_tokens"):
        SEAM(model="toy:tiny", benign_tokens="prompt")


def test_exact_and_finite_difference_updates_agree():
    """Pure L_sd (no L_ul, alpha 0) so the update is the estimate alone; SGD keeps the delta linear in it."""
    deltas = {}
    for estimator in ("exact", "finite_difference"):
        module = SEAM(model="toy:tiny", alpha=0.0, beta=1.0, use_unlearning=False, estimator=estimator,
                      optimizer="sgd", lr=1e-2)
        before = params_of(module)
        fit(module)
        deltas[estimator] = [a - b for a, b in zip(params_of(module), before)]
    assert global_norm(deltas["exact"]) > 0
    assert cosine(deltas["exact"], deltas["finite_difference"]) > 0.99
    assert rel_err(deltas["finite_difference"], deltas["exact"]) < 0.05


def test_gradient_clipping_caps_the_applied_norm():
    module = SEAM(model="toy:tiny", grad_clip=1e-3, optimizer="sgd", lr=1e-2)
    capture = Capture()
    fit(module, callbacks=[capture])
    assert float(global_norm(capture.grads[0])) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("kwargs, absent", [
    ({"alpha": 0.0}, {"train/L_up"}),
    ({"beta": 0.0}, {"train/cos_ab", "train/est_norm"}),
    ({"use_unlearning": False}, {"train/L_ul"}),
])
def test_ablations_run_and_log_their_terms(kwargs, absent):
    module = SEAM(model="toy:tiny", **kwargs)
    before = params_of(module)
    trainer = fit(module, steps=2)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(params_of(module), before))
    logged = set(trainer.callback_metrics)
    assert "train/loss" in logged and not absent & logged
    assert {"train/L_ul", "train/L_up", "train/cos_ab", "train/est_norm"} - absent <= logged


def test_bf16_weights_are_refused_and_bf16_mixed_trains():
    with pytest.raises(UserError, match="bf16-mixed"):
        fit(SEAM(model="toy:tiny"), precision="bf16-true")
    with pytest.raises(UserError, match="fp32"):
        fit(SEAM(model="toy:tiny", dtype="bfloat16"))
    module = SEAM(model="toy:tiny")
    fit(module, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in module.trainable_parameters())
    assert torch.isfinite(module.trainer.callback_metrics["train/loss"])


def test_reference_bf16_is_an_opt_in_that_trains_and_logs_how_much_of_the_step_rounds_away():
    with pytest.warns(UserWarning, match="reference_bf16"):
        trainer = fit(SEAM(model="toy:tiny", dtype="bfloat16", beta=1.0, precision="reference_bf16"),
                      precision="bf16-true")
    unmoved = float(trainer.callback_metrics["train/bf16_unmoved_share"])
    assert 0.5 < unmoved <= 1.0  # most of eps * v rounds away in bf16 weights (the point of the warning)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    with pytest.raises(UserError, match="reference_bf16"):
        fit(SEAM(model="toy:tiny", precision="reference_bf16"))  # fp32 weights: not the reference's precision
    with pytest.raises(UserError, match="precision"):
        SEAM(model="toy:tiny", precision="fp16")


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="estimator"):
        SEAM(model="toy:tiny", estimator="central")
    with pytest.raises(UserError, match="no loss term"):
        SEAM(model="toy:tiny", alpha=0.0, beta=0.0, use_unlearning=False)


def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path, cli):
    """2 ranks x batch 2 vs 1 process x batch 4 on a 4-triplet set: every step sees the whole set.

    The per-rank split changes every epoch and the examples differ in length; SEAM weights the
    per-rank means by token counts, so both runs follow the same global-batch gradient (it matches
    to ~1e-6 relative: summation order, amplified 1/eps by the finite difference). SGD keeps the
    comparison linear in the gradient: AdamW's g/sqrt(v) blows that round-off up to ~lr on
    near-zero gradient entries (measured 3e-4 after 5 steps at lr 1e-3).
    """
    steps, init = 5, {"model": "toy:tiny", "optimizer": "sgd", "lr": 0.5, "scheduler": "cosine", "warmup_ratio": 0.2}
    dump = tmp_path / "dump"
    path = write_ddp_config(tmp_path, "SEAM", init, steps, dump)
    result = cli("fit", "--config", str(path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = assert_ranks_identical(dump)

    single = SEAM(**init)
    initial = {f"model.{n}": p.detach().clone() for n, p in single.model.named_parameters()}
    capture = Capture()
    fit(single, steps=steps, callbacks=[capture], batch_size=4, limit=4)
    tokens = [(capture.batches[0][part]["labels"] != -100).sum(1).tolist() for part in ("harmful", "refusal", "benign")]
    assert any(len(set(t)) > 1 for t in tokens), f"want unequal response lengths across examples: {tokens}"
    names = {f"model.{n}": p.detach() for n, p in single.model.named_parameters()}
    diff = max(float((rank0[k] - names[k]).abs().max()) for k in rank0)
    moved = max(float((names[k] - initial[k]).abs().max()) for k in names)
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)


def _held_out_cosine(module) -> float:
    """cos(g_harm, g_benign) on held-out toy eval items with gold answers (the bench's mechanism diagnostic)."""
    from immunize.datamodules import EvalData, Source
    from immunize.lightning_modules.evaluation.diagnostics import gradient_cosine, round_robin_tasks

    data = EvalData(sources=[Source(kind="toy")], n_harmful_per_category=5, n_per_task=20)
    data.connect(module.tokenizer)
    items = data.items()
    harmful = data.gold_batch([it for it in items if it.kind == "harmful"], 64)
    benign = data.gold_batch(round_robin_tasks([it for it in items if it.kind != "harmful"]), 64)
    return gradient_cosine(module.model, module.trainable_parameters(), harmful, benign)


def test_l_sd_drives_the_held_out_gradient_cosine_negative():
    """Regression test of the L_sd gradient's direction: SEAM without L_ul, beta 1, 50 steps on toy:tiny takes the
    held-out cos(g_harm, g_benign) below -0.2 (measured: +0.80 -> -0.97); beta 0 leaves it where it was (+0.80)."""
    moved = SEAM(model="toy:tiny", use_unlearning=False, beta=1.0, lr=3e-4)
    before = _held_out_cosine(moved)
    fit(moved, steps=50, batch_size=8, limit=400)
    assert _held_out_cosine(moved) < -0.2 < before
    still = SEAM(model="toy:tiny", use_unlearning=False, beta=0.0, lr=3e-4)
    fit(still, steps=50, batch_size=8, limit=400)
    assert _held_out_cosine(still) > 0.5
