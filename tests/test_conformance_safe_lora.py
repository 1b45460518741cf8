"""Conformance of immunize.callbacks.SafeLoRA with its authors' code.

Reference: github.com/IBM/SafeLoRA (snapshot d81fda1), files read:
- model.py, SafeLoRA.get_aligned_matrix: base and aligned models loaded whole; their named_parameters zipped in order;
  for every pair whose name contains a LoRA target module name, vec = aligned - base and
  P = torch.mm(vec, vec.t()) / torch.norm(vec) (Frobenius norm, not squared);
- model.py, SafeLoRA.projected_weighted: the peft model's parameters zipped with those of a deep copy taken before
  any change; for each "lora" parameter, one whose shape[0] is r is lora_A (kept as `B`), any other is lora_B: with
  the next P, W = P @ lora_B, cos = numpy.round(cosine_similarity(flat(W @ lora_A), flat(lora_B @ lora_A)), 5); the
  parameter becomes W where cos <= the threshold, else the original; dist = 1 / (1 + ||param - W||), reported as
  the mean over modules;
- model.py, SafeLoRA.__init__: "number" mode takes numpy.sort(cos)[:num_proj_layers][-1] as the threshold (a first
  pass at 0.3 is overwritten by the second), "threshold" mode uses config.threshold;
- config.py: select_layers_type "number", num_proj_layers 10, threshold 0.5.

One application recomputed here that way, in plain tensor code (whole models loaded with transformers, parameters
paired by order, the cosine of the flattened products, numpy's sort and round): the callback's projection at the end
of a real LoRA fit ("number" mode) must give the same cosines, the same selected modules, lora_B equal to 1e-6 and the
same diagnostic; lora_A and every base weight unchanged. "threshold" mode is checked on the same fine-tuned weights.
"""
from __future__ import annotations

import copy

import numpy
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.finetune import Recorder, data, module, params_of, toy_model_dir, trainer
from immunize.callbacks import SafeLoRA

TARGETS = ["q_proj", "v_proj"]  # helpers.finetune.module(lora=True): r 4 on q_proj and v_proj
R, TOL = 4, 1e-6


def reference_matrices(base_dir: str, aligned_dir: str) -> list[torch.Tensor]:
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    aligned = AutoModelForCausalLM.from_pretrained(aligned_dir)
    out = []
    for (_, b), (a_name, a) in zip(base.named_parameters(), aligned.named_parameters()):
        if any(t in a_name for t in TARGETS):
            vec = (a - b).detach()
            out.append(torch.mm(vec, vec.t()) / torch.norm(vec))
    return out


def reference_projection(peft_model, matrices, threshold):
    """The reference's projected_weighted on `peft_model` in place; returns (cosines, projected flags, mean dist)."""
    original = copy.deepcopy(peft_model)
    idx, cosines, flags, dists = 0, [], [], []
    with torch.no_grad():
        for (name, param), (_, param_ori) in zip(peft_model.named_parameters(), original.named_parameters()):
            if "lora" not in name:
                continue
            if param.shape[0] == R:
                lora_a = param_ori.clone()
                continue
            p = matrices[idx]
            w = torch.mm(p, param_ori)
            f_w, ori = torch.mm(w, lora_a), torch.mm(param_ori, lora_a)
            cos = numpy.round(torch.nn.functional.cosine_similarity(f_w.reshape(1, -1), ori.reshape(1, -1)).item(), 5)
            cosines.append(float(cos))
            flags.append(bool(cos <= threshold))
            param.data = w if cos <= threshold else param_ori.clone()
            dists.append(float(1 / (1 + torch.norm(param.reshape(1, -1) - w.reshape(1, -1)))))
            idx += 1
    assert idx == len(matrices)
    return cosines, flags, float(numpy.mean(dists))


def fresh_with(weights: dict):
    torch.manual_seed(0)
    m = module(lora=True)
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            p.copy_(weights[n])
    return m


def test_one_application_equals_the_reference(tmp_path):
    base_dir = toy_model_dir(tmp_path / "base", init_seed=1)
    aligned_dir = toy_model_dir(tmp_path / "aligned", init_seed=0)  # what module() starts from
    torch.manual_seed(0)
    m, rec = module(lora=True, optimizer="sgd", lr=0.5), Recorder()
    cb = SafeLoRA(base_model=base_dir, select="number", num_proj_layers=2, report_file=None)
    trainer(tmp_path, [rec, cb], max_steps=3).fit(m, data())
    trained, after = rec.at_train_end, params_of(m)
    matrices = reference_matrices(base_dir, aligned_dir)
    assert len(matrices) == 4

    # "number" mode: a first pass for the cosines, the threshold from numpy's sort, then the projection
    first, _, _ = reference_projection(fresh_with(trained).model, matrices, 0.3)
    threshold = float(numpy.sort(first)[:2][-1])
    ref = fresh_with(trained)
    cosines, flags, dist = reference_projection(ref.model, matrices, threshold)
    assert 0 < sum(flags) < len(flags)  # a real selection
    report = cb.report
    got = list(report["per_module"].values())
    assert [g["cosine"] for g in got] == pytest.approx(cosines, abs=TOL)
    assert [g["projected"] for g in got] == flags and report["threshold"] == threshold
    assert abs(report["distance"] - dist) <= TOL
    expected = params_of(ref)
    for n, p in after.items():
        if "lora_B" in n:
            assert (p - expected[n]).abs().max() <= TOL, n
        else:
            assert torch.equal(p, trained[n]), n  # lora_A and base weights untouched

    # "threshold" mode, on the same fine-tuned weights, with a threshold between the cosines
    mid = float(numpy.median(cosines))
    ref2, ours = fresh_with(trained), fresh_with(trained)
    _, flags2, dist2 = reference_projection(ref2.model, matrices, mid)
    report2 = SafeLoRA(base_model=base_dir, select="threshold", threshold=mid).project(ours.model)
    assert [g["projected"] for g in report2["per_module"].values()] == flags2 and 0 < sum(flags2) < len(flags2)
    assert abs(report2["distance"] - dist2) <= TOL
    theirs = params_of(ref2)
    assert all((p - theirs[n]).abs().max() <= TOL for n, p in params_of(ours).items())
