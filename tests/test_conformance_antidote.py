"""Conformance of immunize.callbacks.Antidote with its authors' code.

Reference: github.com/git-disl/Antidote (snapshot 26e2ade), files read: utils.py (find_layers: exact nn.Linear
modules whose name contains "lora", or q/k/v under full fine-tuning; WrappedGPT.add_batch: the running mean over
samples of each sample's sum over tokens of x^2; prune_wanda_outlier: score |W| * sqrt(scaler_row), per row a
stable ascending sort, the lowest int(cols * (1 - dense_ratio)) kept, the rest marked; masks taken layer by layer
but never applied before the next layer, so every score comes from the unpruned model), trainer.py (save_mask),
train.py (the marked weights are zeroed: p *= 1 - mask), script/finetune/*.sh (2000 harmful samples, batch 1).

One pruning application recomputed here the reference's way, in plain tensor code (forward hooks on the LoRA
matrices, one unpadded calibration sequence at a time, the running mean, the score, the sort): the set of zeroed
weights must be identical and every other weight unchanged; the base weights of a LoRA fine-tune are not touched.
Both the LoRA case (the reference's default) and full fine-tuning (q/k/v) are checked.
"""
from __future__ import annotations

import torch
from torch import nn

from helpers.finetune import H_SET, Recorder, data, encoded, module, params_of, trainer
from immunize.callbacks import Antidote

RATIO, N_CAL = 0.3, 5


def reference_masks(model, samples, lora: bool) -> dict[str, torch.Tensor]:
    """{parameter name: mask of the weights the reference zeroes}, from the unpruned model."""
    targets = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and ".layers." in f".{name}":
            if (lora and "lora" in name) or (not lora and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")):
                targets[name] = mod
    scaler = {n: torch.zeros(m.in_features, dtype=torch.float32) for n, m in targets.items()}
    seen = {n: 0 for n in targets}

    def hook(n):
        def add(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # one sample: [tokens, in]
            scaler[n] *= seen[n] / (seen[n] + 1)
            seen[n] += 1
            scaler[n] += x.pow(2).sum(0) / seen[n]
        return add

    handles = [m.register_forward_hook(hook(n)) for n, m in targets.items()]
    with torch.no_grad():
        for row in samples:  # batch size 1, no padding, as the reference's calibration loader
            model(input_ids=torch.tensor([row["input_ids"]]))
    for h in handles:
        h.remove()
    masks = {}
    for n, m in targets.items():
        score = m.weight.detach().abs().float() * scaler[n].sqrt()[None, :]
        keep = int(score.shape[1] * (1 - RATIO))
        order = torch.sort(score, dim=-1, stable=True)[1]
        mask = torch.ones_like(score)
        mask.scatter_(1, order[:, :keep], 0)
        masks[f"{n}.weight"] = mask.bool()
    return masks


def check(tmp_path, tokenizer, lora: bool):
    m, rec = module(lora=lora), Recorder()
    ad = Antidote(harmful=H_SET, dense_ratio=RATIO, n_calibration=N_CAL, batch_size=2, report_file=None)
    trainer(tmp_path, [rec, ad], max_steps=1).fit(m, data())
    samples = encoded(H_SET, "harmful", tokenizer)[:N_CAL]
    fresh = module(lora=lora)
    with torch.no_grad():
        for n, p in fresh.model.named_parameters():
            p.copy_(rec.at_train_end[n])
    fresh.model.eval()
    masks = reference_masks(fresh.model, samples, lora)
    assert masks and (all("lora_" in n for n in masks) if lora else len(masks) == 2 * 3)
    after = params_of(m)
    for n, p in after.items():
        before = rec.at_train_end[n]
        if n in masks:
            assert torch.equal(p == 0, masks[n] | (before == 0)), n
            assert torch.equal(p[~masks[n]], before[~masks[n]]), n
        else:
            assert torch.equal(p, before), n
    return masks


def test_lora_fine_tune_prunes_what_the_reference_prunes(tmp_path, toy_tokenizer):
    masks = check(tmp_path, toy_tokenizer, lora=True)
    assert {n.split("self_attn.")[1] for n in masks} == {f"{proj}.lora_{ab}.default.weight" for proj in ("q_proj", "v_proj")
                                                         for ab in "AB"}


def test_full_fine_tune_prunes_what_the_reference_prunes(tmp_path, toy_tokenizer):
    check(tmp_path, toy_tokenizer, lora=False)
