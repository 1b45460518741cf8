"""Conformance of immunize.callbacks.RandomPerturbation with the Panacea authors' random-perturbation baseline.

Reference: github.com/w-yibo/Panacea (snapshot at commit d17b2db), files read:
- trainer.py, class SFT_eval: before evaluating, every tensor with requires_grad gets `randn_like(param) * std` added
  in place (i.i.d. N(0, std^2) per element, additive, independent of the weight values; frozen base weights of a
  LoRA model untouched);
- train.py: `--noise_std` (default 0) feeds SFT_eval.init(std=...), but the SFT_eval lines are commented out, so as
  published the baseline is not reachable from train.py.
The reference draws from torch's global generator on the parameter's device (not reproducible across devices);
immunize documents its draw: one CPU torch.Generator seeded with `seed`, then torch.randn(shape) * sigma per trainable
tensor in parameter order. That documented draw is written out here in plain tensor code, and the change the callback
makes at fit end (after one SGD step of training, so it acts on fine-tuned weights) must equal it to 1e-5 global
relative norm, on full weights and on LoRA adapters (base weights bit-equal); the realised noise must also have the
reference's statistics (mean 0, std sigma, no dependence on the weights), and it is added exactly once. The `norm`
option (immunize's same-norm random baseline for Panacea, not in the reference) is checked against its documented
rule: the same draw rescaled to the given global L2 norm.

Deliberate deviation: the reference adds fresh noise at every evaluate() call (so k evaluations leave std
sqrt(k) * std in the weights); immunize adds it once, at fit end, to the weights it exports.
"""
from __future__ import annotations

import math

import pytest
import torch
from helpers.finetune import Recorder, data, module, params_of, trainer
from helpers.reference import gnorm64, rel64
from immunize.callbacks import RandomPerturbation

TOL = 1e-5


def documented_noise(shapes, sigma: float, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float32) * sigma for s in shapes]


def perturbed_fit(tmp_path, lora: bool, **kw):
    m, rec = module(lora=lora, optimizer="sgd", lr=0.05), Recorder()
    cb = RandomPerturbation(**kw)
    tr = trainer(tmp_path, [cb, rec], max_steps=1)
    tr.fit(m, data())
    names = [n for n, p in m.model.named_parameters() if p.requires_grad]
    return m, cb, tr, rec, names


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_noise_follows_reference_rule(tmp_path, lora):
    sigma, seed = 0.02, 7
    m, cb, tr, rec, names = perturbed_fit(tmp_path, lora, sigma=sigma, seed=seed)
    trained = rec.at_train_end
    assert any(not torch.equal(trained[n], rec.steps[0]["before"][n]) for n in names)  # the fit trained the weights
    final = params_of(m)
    change = [final[n] - trained[n] for n in names]
    expected = documented_noise([trained[n].shape for n in names], sigma, seed)
    assert rel64(change, expected) <= TOL
    frozen = [n for n in final if n not in names]
    assert bool(frozen) == lora and all(torch.equal(final[n], trained[n]) for n in frozen)  # only trainable tensors

    # the reference's statistics: i.i.d. N(0, sigma^2), additive (independent of the weights)
    flat = torch.cat([c.reshape(-1) for c in change]).double()
    count = flat.numel()
    assert abs(float(flat.mean())) < 5 * sigma / math.sqrt(count)
    assert float(flat.std()) == pytest.approx(sigma, rel=5 / math.sqrt(2 * count) + 1e-3)
    assert float((flat.abs() < sigma).double().mean()) == pytest.approx(0.6827, abs=5 * 0.47 / math.sqrt(count))
    weights = torch.cat([trained[n].reshape(-1) for n in names]).double()
    corr = float(torch.corrcoef(torch.stack([flat.abs(), weights.abs()]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(count)

    cb.on_fit_end(tr, m)  # exactly once
    assert all(torch.equal(p, final[n]) for n, p in params_of(m).items())


def test_norm_option_follows_documented_rule(tmp_path):
    sigma, seed, norm = 0.01, 3, 0.3
    m, cb, _, rec, names = perturbed_fit(tmp_path, False, sigma=sigma, seed=seed, norm=norm)
    change = [params_of(m)[n] - rec.at_train_end[n] for n in names]
    draw = documented_noise([rec.at_train_end[n].shape for n in names], sigma, seed)
    total = gnorm64(draw)
    expected = [d * float(norm / total) for d in draw]
    assert abs(float(total) - norm) > 0.1  # the rescaling is not a no-op here
    assert rel64(change, expected) <= TOL
    assert cb.noise_norm == pytest.approx(norm, rel=TOL)
