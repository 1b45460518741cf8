"""Conformance of immunize.callbacks.Lisa with its authors' code.

Reference: github.com/git-disl/Lisa (snapshot at commit 68e3659), files read:
- trainer.py, class LisaTrainer: init (status "alignment" first, both anchors = the initial weights), check_mode (the
  alignment/fine-tune switch counted in training steps by `clock`; an alignment step discards the user batch and takes
  one from the cycled alignment loader of the same batch size), switch_model (on a switch the weights of the phase
  that ends become the other phase's anchor), training_step (loss + rho/2 |w - w_other|^2 over the trainable tensors,
  only once `steps > 0.1 * len(train_dataloader) * num_train_epochs`);
- train.py (the LisaTrainer set-up) and script/finetune/lisa_poison_ratio.sh (rho 1, 100 / 900 steps).

The reference's state machine (status, clock, steps, alignment_weights, finetune_weights) is re-run here in plain
tensor code from the fit's initial weights, with SGD (momentum 0, no weight decay, constant lr, no warmup), so the
update is -lr * gradient. At every step the gradient the optimizer applies in the fit (after Lisa's hook) is compared
with the gradient of the reference's loss (the model forward, a masked token-mean cross-entropy from
helpers.reference and the proximal term, through torch.autograd.grad; no immunize helper for the phase, anchor or
proximal term), and the weights at train end with the replayed ones, each to 1e-5 global relative norm. The batches
trained on at alignment steps must be the alignment draws (immunize's documented seeded draw; the reference's own
loader is shuffled).

Deliberate deviation: the reference hard-codes the 10% proximal warm-up; immunize's default is none (the method as
written), proximal_warmup=0.1 restores it and is used here. Both start the
proximal term at the first step whose index is > 0.1 * total (immunize started it one step early when 0.1 * total
was an integer, found by this test and fixed).
"""
from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers.finetune import data, encoded, module, params_of, trainer
from helpers.reference import causal_lm_ce, gnorm64, rel64
from immunize.callbacks import Lisa
from immunize.callbacks.base import draw_indices
from immunize.datamodules import Source
from immunize.datamodules.collate import pad_right

PAIRS = Source(kind="toy", part="pairs", split="align", limit=30)
TOL = 1e-5
LR = 0.05
RHO = 1.0  # the reference scripts' RHO
A, F = 2, 3  # alignment_step, finetune_step
WARMUP = 0.1  # the reference's hard-coded fraction


class LoaderTap(L.Callback):
    """Before Lisa: the batch the user loader handed to each step."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})


class StepTap(L.Callback):
    """After Lisa: the batch trained on and the gradient the optimizer gets."""

    def __init__(self):
        self.batches, self.grads = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None})


def reference_replay(w0: dict, user_batches: list, alignment_batch, total: int):
    """The reference LisaTrainer over `total` steps from w0: per step (status, batch, gradient, proximal gradient)."""
    ref = module()
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            p.copy_(w0[n])
    names = [n for n, p in ref.model.named_parameters() if p.requires_grad]
    params = [p for p in ref.model.parameters() if p.requires_grad]
    status, clock, steps, draws = "alignment", 0, 0, 0
    align_w = [p.detach().clone() for p in params]
    ft_w = [p.detach().clone() for p in params]
    out = []
    for k in range(total):
        # check_mode: switch when the phase's clock has run out; on a switch the weights of the ending phase are saved
        # as the anchor of the phase now starting
        switch = steps != 0 and (clock % A == 0 if status == "alignment" else clock % F == 0)
        if switch:
            status = "finetune" if status == "alignment" else "alignment"
            if status == "alignment":
                ft_w = [p.detach().clone() for p in params]
            else:
                align_w = [p.detach().clone() for p in params]
            clock = 0
        if status == "alignment":
            batch = alignment_batch(draws)
            draws += 1
        else:
            batch = user_batches[k]
        loss = causal_lm_ce(ref.model, batch)
        prox_on = steps > WARMUP * total
        if prox_on:
            anchor = ft_w if status == "alignment" else align_w
            loss = loss + sum(RHO / 2 * ((p - a) ** 2).sum() for p, a in zip(params, anchor))
        grad = torch.autograd.grad(loss, params)
        prox = ([RHO * (p.detach() - a) for p, a in zip(params, anchor)] if prox_on
                else [torch.zeros_like(p) for p in params])
        out.append({"status": status, "batch": batch, "grad": list(grad), "prox": prox})
        with torch.no_grad():
            for p, g in zip(params, grad):
                p.sub_(LR * g)
        steps += 1  # noqa: SIM113 (the reference's own counter)
        clock += 1
    return names, out, {n: p.detach().clone() for n, p in zip(names, params)}


@pytest.mark.parametrize("total", [
    8,  # 0.1 * 8 = 0.8: both start the proximal term at step 1
    10,  # 0.1 * 10 = 1: the reference's `steps > 0.1 * total` first holds at step 2
])
def test_lisa_steps_match_reference(tmp_path, toy_tokenizer, total):
    m = module(optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
    w0 = params_of(m)
    loader, step = LoaderTap(), StepTap()
    # batch_size None: the alignment batch is as large as the user batch, as in the reference
    lisa = Lisa(alignment=PAIRS, rho=RHO, alignment_steps=A, user_steps=F, proximal_warmup=WARMUP, seed=0)
    trainer(tmp_path, [loader, lisa, step], max_steps=total).fit(m, data(batch_size=4))
    assert len(step.grads) == total

    rows = encoded(PAIRS, "refusal", toy_tokenizer)

    def alignment_batch(d):
        return pad_right([rows[i] for i in draw_indices(len(rows), 4, d, 0, 1, 0)], toy_tokenizer.pad_token_id)

    names, ref, w_end = reference_replay(w0, loader.batches, alignment_batch, total)
    statuses = [r["status"] for r in ref]
    assert statuses == (["alignment"] * A + ["finetune"] * F) * (total // (A + F)) + (
        ["alignment"] * A + ["finetune"] * F)[: total % (A + F)]
    visible = 0
    for k, r in enumerate(ref):
        assert all(torch.equal(step.batches[k][key], r["batch"][key]) for key in r["batch"]), (k, r["status"])
        applied = [step.grads[k][n] for n in names]
        assert rel64(applied, r["grad"]) <= TOL, (k, r["status"], rel64(applied, r["grad"]))
        prox_share = float(gnorm64(r["prox"]) / gnorm64(r["grad"]))
        visible += prox_share > 100 * TOL
    assert visible >= 3  # the proximal term is far above the tolerance at several steps of both phases
    end = params_of(m)
    assert rel64([end[n] - w0[n] for n in names], [w_end[n] - w0[n] for n in names]) <= TOL
