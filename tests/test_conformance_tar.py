"""Conformance of immunize.lightning_modules.TAR with its authors' code.

Reference: github.com/rishub-tamirisa/tamper-resistance (snapshot 19de233), files read: modules/training.py
(tar_training_loop, inner_loop_step, tamper_resistance_obj, the weighting `schedule`), modules/objectives.py
(max_entropy_loss, obj_model_mse_representations, log_p_loss), modules/utils.py (the attacker's learning-rate draw),
run_tar_bio.sh / run_tar_cyber.sh (K 64, every 4th step, lambda 0.0625, scale 4, AdamW attacker).

One outer step recomputed here the reference's way, in plain tensor code (torch's AdamW as the attacker, hooks-free
forwards, an entropy and the representation distance written here, a CE from helpers.reference; no immunize TAR
helper):
    theta = w; attacker = fresh AdamW(lr, betas 0.9/0.999, eps 1e-8, weight decay 0.01)
    for i in 0..K-1: attacker step on CE(adversary batch i); if (i + 1) % every == 0:
        G += lam * exp(decay * (i - (K - 1))) * d(-entropy on the meta batch) / d w_attacked
    w = theta; g = d[CE(benign) + mean_l mean_t |h_l - h_l(original)| + CE(refusal)] / d w + G
The second optimizer step of a fit is checked (so the model differs from the original one and the representation
term has a gradient), in float64, with SGD outside (update = -lr * g), to 1e-5 global relative norm. The attacker's
learning-rate draw is fixed by giving one learning rate.

Deliberate deviations (docs/fidelity.md), kept in the recomputation: the entropy, the CEs and the representation
distance are taken over the real tokens (entropy and CE over the answer positions, as the harmful-request data has
prompts; the reference's knowledge-restriction text has none and its fixed-length padding enters its means); the
retain loss keeps the refusal CE (refusal_weight 1; 0 gives the reference's retain set).
"""
from __future__ import annotations

import copy
import math

import lightning as L
import torch

from helpers.alignment import fit
from helpers.reference import forward, rel, token_ce
from immunize.datamodules.drawn import drawn_batch
from immunize.lightning_modules import TAR

K, EVERY, DECAY, LAM, INNER_LR, LR = 4, 2, 0.0625, 4.0, 3e-3, 1e-2


def minus_entropy(logits, labels):
    logp = logits[:, :-1].log_softmax(-1)
    per_token = (logp.exp() * logp).sum(-1)
    mask = labels[:, 1:] != -100
    return per_token[mask].mean()


def reference_gradient(model, original, benign, refusal, adversary, meta):
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    attacker = torch.optim.AdamW(params, lr=INNER_LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    tamper = [torch.zeros_like(p) for p in params]
    first = last = None
    for i in range(K):
        model.zero_grad(set_to_none=True)
        loss = token_ce(forward(model, adversary[i]).logits, adversary[i]["labels"])
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
        loss.backward()
        attacker.step()
        if (i + 1) % EVERY == 0:
            model.zero_grad(set_to_none=True)
            (LAM * math.exp(DECAY * (i - (K - 1))) * minus_entropy(forward(model, meta).logits, meta["labels"])).backward()
            tamper = [t + p.grad for t, p in zip(tamper, params)]
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    model.zero_grad(set_to_none=True)
    out = forward(model, benign, output_hidden_states=True)
    with torch.no_grad():
        anchor = forward(original, benign, output_hidden_states=True).hidden_states
    real = benign["attention_mask"].bool()
    distance = torch.stack([(h - h0).norm(dim=-1)[real].mean() for h, h0 in zip(out.hidden_states, anchor)]).mean()
    retain = (token_ce(out.logits, benign["labels"]) + distance
              + token_ce(forward(model, refusal).logits, refusal["labels"]))
    retain.backward()
    return [p.grad + t for p, t in zip(params, tamper)], distance, (first, last)


class Record(L.Callback):
    """The original model, and the weights and batch at the start of the second step."""

    def on_train_start(self, trainer, pl_module):
        self.original = copy.deepcopy(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            self.batch, self.model = copy.deepcopy(batch), copy.deepcopy(pl_module.model)


def test_one_outer_step_equals_the_reference():
    module = TAR(model="toy:tiny", inner_steps=K, inner_lrs=[INNER_LR], tr_every=EVERY, tr_decay=DECAY, lam_tr=LAM,
                 optimizer="sgd", lr=LR, scheduler="constant", warmup_ratio=0.0)
    record = Record()
    trainer = fit(module, steps=2, callbacks=[record], precision="64-true")
    assert trainer.global_step == 2
    after = [p.detach() for p in module.model.parameters()]
    before = [p.detach() for p in record.model.parameters()]
    update = [a - b for a, b in zip(after, before)]
    pad = module.tokenizer.pad_token_id
    rows = record.batch["benign"]["input_ids"].shape[0]  # the adversary's batch size is the datamodule's
    adversary = [drawn_batch(module.attack_rows, rows, 1 * K + i, 0, 1, 0, pad) for i in range(K)]
    meta = drawn_batch(module.meta_rows, rows, 1, 0, 1, 0, pad)
    grad, distance, (first, last) = reference_gradient(record.model, record.original, record.batch["benign"],
                                                       record.batch["refusal"], adversary, meta)
    expected = [-LR * g for g in grad]
    assert rel(update, expected) <= 1e-5
    assert float(distance) > 0  # the second step is away from the original model: the term is live
    assert last < first  # the simulated attack attacks
