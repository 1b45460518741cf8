"""Conformance of immunize.callbacks.Panacea (mode "in_training") with its authors' code.

Reference: github.com/w-yibo/Panacea (snapshot at commit d17b2db), files read:
- trainer.py, class Panacea: training_step / step_eps (the per-step algorithm) and init (eps per trainable tensor);
  BoosterAlignmentTrainer._grad_norm (one L2 norm of the per-tensor norms) and sample_from_harmful (own cycled loader);
- train.py: after trainer.train(), the last eps is added once to every requires_grad tensor before save_pretrained;
- script/finetune/panacea_gsm8k.sh: eps_rho 1, lamb 1e-3, constant schedule.

The reference step, recomputed here in plain tensor code (model forward + a masked token-mean cross-entropy written
below; no immunize helper for eps, the clamp or the correction):
    g_task = grad g(w; user batch)
    g0 = grad h(w; harmful batch);  eps = eps_rho * g0 / (|g0| + 1e-7)   (|.|: one L2 norm over all trainable tensors)
    g1 = grad of clamp(h(w + eps), max=5)  (zero when h(w + eps) > 5)
    gradient handed to the optimizer = -(lamb * (g1 - g0) - g_task)
    after the last step: w += eps (of that step), once.
With SGD (momentum 0, no weight decay, constant lr, no warmup) the update is -lr * gradient, so a two-step fit is
replayed from the same initial weights and compared: the gradient the optimizer applies at each step, the weights at
train end, eps, and the weights after fit end (trained weights + the last eps), each to 1e-5 global relative norm.

Cases: the reference's rho 1 / lam 1e-3 on full weights (the untrained toy:tiny has h(w + eps) > 5: the clamp's
zero-gradient branch) and on LoRA factors; and a model first trained a few steps on the h set (h(w + eps) < 5, the
clamp does not fire) with a small rho and a large lam so the correction term is far above the tolerance.

As published the reference cannot run (it backpropagates an undefined `clip_loss_h` and train.py instantiates a
misspelled `Pancacea`); the replay follows the evident intent: the clamped loss. Deliberate deviation: the reference
continues the alignment LoRA (`--alternating single_lora`); immunize always trains a fresh adapter on the given
(merged) model and has no option to continue one. The LoRA case emulates a continued adapter by giving lora_B seeded
non-zero values before the fit (a fresh adapter's B = 0 makes eps on A vanish); the step math does not depend on where
the adapter came from. The reference draws its harmful batches from its own shuffled loader; the replay uses
immunize's documented seeded draw (data plumbing, not the quantity under test).
"""
from __future__ import annotations

import pytest
import torch
from helpers.finetune import H_SET, Recorder, data, encoded, module, params_of, trainer
from helpers.reference import causal_lm_ce, gnorm64, rel64
from immunize.callbacks import Panacea
from immunize.callbacks.base import draw_indices
from immunize.datamodules.collate import pad_right

TOL = 1e-5
LR = 0.05
HBS = 4  # harmful rows per step (the reference's 10, smaller for speed)
STEPS = 2


def reference_step(model, params, task_batch, harmful_batch, rho, lam):
    """One step of the reference's step_eps: (gradient for the optimizer, eps, h(w + eps), correction)."""
    g_task = torch.autograd.grad(causal_lm_ce(model, task_batch), params)
    g0 = torch.autograd.grad(causal_lm_ce(model, harmful_batch), params)
    norm = torch.norm(torch.stack([g.norm(p=2) for g in g0]), p=2)  # norm of the per-tensor norms
    eps = [g * (rho / (norm + 1e-7)) for g in g0]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    h1 = causal_lm_ce(model, harmful_batch)
    g1 = torch.autograd.grad(torch.clamp(h1, max=5), params, allow_unused=True)
    g1 = [torch.zeros_like(p) if g is None else g for g, p in zip(g1, params)]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    grad = [-(lam * (a - b) - t) for a, b, t in zip(g1, g0, g_task)]
    correction = [-lam * (a - b) for a, b in zip(g1, g0)]
    return grad, eps, float(h1), correction


CASES = {
    "full_reference_defaults": {"lora": False, "rho": 1.0, "lam": 1e-3},
    "lora_reference_defaults": {"lora": True, "rho": 1.0, "lam": 1e-3},
    "full_unclamped_large_lam": {"lora": False, "rho": 0.05, "lam": 0.5, "fit_h_first": True},
}


def fit_on_h(m) -> None:
    """A few full-batch Adam steps on the h set, so h is below the reference's clamp (a harmful-compliant start)."""
    b = pad_right(encoded(H_SET, "harmful", m.tokenizer), m.tokenizer.pad_token_id)
    opt = torch.optim.Adam(m.model.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        causal_lm_ce(m.model, b).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", list(CASES))
def test_panacea_step_and_fit_end_match_reference(tmp_path, case):
    cfg = CASES[case]
    rho, lam = cfg["rho"], cfg["lam"]
    m = module(lora=cfg["lora"], optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0, scheduler="constant",
               warmup_ratio=0.0)
    if cfg["lora"]:  # emulate a continued (trained) alignment adapter: B != 0
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    if cfg.get("fit_h_first"):
        fit_on_h(m)
    w0 = params_of(m)
    rec = Recorder()
    pan = Panacea(rho=rho, lam=lam, harmful=H_SET, harmful_batch_size=HBS, loss_clamp=5.0, seed=0, eps_file=None)
    trainer(tmp_path, [pan, rec], max_steps=STEPS).fit(m, data())
    assert len(rec.steps) == STEPS

    # ----- replay with the reference algorithm from the same initial weights -----
    ref = module(lora=cfg["lora"])
    with torch.no_grad():
        for n, p in ref.model.named_parameters():
            p.copy_(w0[n])
    names = [n for n, p in ref.model.named_parameters() if p.requires_grad]
    params = [p for p in ref.model.parameters() if p.requires_grad]
    assert names == [n for n, p in m.model.named_parameters() if p.requires_grad]
    rows = encoded(H_SET, "harmful", m.tokenizer)
    pad = m.tokenizer.pad_token_id
    eps = None
    for k in range(STEPS):
        hb = pad_right([rows[i] for i in draw_indices(len(rows), HBS, k, 0, 1, 0)], pad)
        grad, eps, h1, corr = reference_step(ref.model, params, rec.steps[k]["batch"], hb, rho, lam)
        applied = [rec.steps[k]["grad"][n] for n in names]
        assert rel64(applied, grad) <= TOL, (case, k, rel64(applied, grad), h1)
        # the correction must be far above the tolerance, or the check above could not see it
        assert float(gnorm64(corr) / gnorm64(grad)) > 10 * TOL, (case, k)
        with torch.no_grad():
            for p, g in zip(params, grad):
                p.sub_(LR * g)
    if case == "full_reference_defaults":
        assert h1 > 5  # this case exercises the clamp's zero-gradient branch
    if case == "full_unclamped_large_lam":
        assert h1 < 5

    trained_ref = [p.detach() for p in params]
    trained = [rec.at_train_end[n] for n in names]
    assert rel64([a - w0[n] for a, n in zip(trained, names)], [b - w0[n] for b, n in zip(trained_ref, names)]) <= TOL
    assert rel64([pan.eps[n] for n in names], eps) <= TOL
    assert float(gnorm64(eps)) == pytest.approx(rho, rel=1e-5)
    # fit end: the last eps added once, to the trainable tensors only
    final = params_of(m)
    expected = [b + e for b, e in zip(trained_ref, eps)]
    assert rel64([final[n] - w0[n] for n in names], [x - w0[n] for x, n in zip(expected, names)]) <= TOL
    assert all(torch.equal(final[n], w0[n]) for n in w0 if n not in names)
