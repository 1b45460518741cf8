"""TAR: the first-order tamper-resistance gradient by hand on quadratics (weights, fresh attacker), the entropy loss,
the simulated attack on the toy model, arguments. The step against the reference: test_conformance_tar.py."""
import math

import pytest
import torch

from helpers.alignment import fit, params_of
from immunize.errors import UserError
from immunize.lightning_modules import TAR
from immunize.lightning_modules.tar import negative_entropy, tar_gradient, tr_weights


def sgd(lr):
    return lambda params: torch.optim.SGD(params, lr=lr)


def test_tar_gradient_is_retain_plus_tamper_gradient_at_the_attacked_weights():
    """h = |w - a|^2 / 2, retain = |w - b|^2 / 2, L_TR = |w - d|^2 / 2: K SGD steps of size lr on h give
    w_K = a + (1 - lr)^K (w - a); L_TR taken once, after the last step (weight exp(0) = 1)."""
    w = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    a, b, d = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [2.0, -2.0, 0.0]))
    start = w.detach().clone()
    lr, lam, steps = 0.1, 2.5, 3
    grads, stats = tar_gradient([w], lambda i: 0.5 * ((w - a) ** 2).sum(), lambda: 0.5 * ((w - b) ** 2).sum(),
                                lambda i: 0.5 * ((w - d) ** 2).sum(), steps, sgd(lr), lam, tr_every=steps)
    attacked = a + (1 - lr) ** steps * (start - a)
    assert torch.allclose(grads[0], (start - b) + lam * (attacked - d), atol=1e-12)
    assert torch.equal(w.detach(), start) and w.grad is None  # the inner attack is undone bit-exactly
    assert stats["harmful_last"] < stats["harmful_first"]


def test_tamper_gradients_are_summed_with_the_exponential_weights_along_the_attack():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    a, d = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    start, lr, decay = w.detach().clone(), 0.5, 0.3
    seen = []
    grads, _ = tar_gradient([w], lambda i: 0.5 * ((w - a) ** 2).sum(), lambda: (w * 0).sum(),
                            lambda i: seen.append(i) or 0.5 * ((w - d) ** 2).sum(), 4, sgd(lr), 2.0, tr_every=2,
                            tr_decay=decay)
    assert seen == [1, 3]  # after inner steps 2 and 4
    at = {i: a + (1 - lr) ** (i + 1) * (start - a) for i in (1, 3)}
    expected = sum(2.0 * math.exp(decay * (i - 3)) * (at[i] - d) for i in (1, 3))
    assert torch.allclose(grads[0], expected, atol=1e-12)
    assert tr_weights(4, 2, None) == {1: 0.25, 3: 0.25} and tr_weights(3, 5, 0.1) == {2: 1.0}


def test_the_adamw_attacker_is_fresh_and_accumulated_gradients_survive():
    """A fresh AdamW per call: two calls from the same weights give the same gradient; p.grad is put back."""
    w = torch.tensor([0.5, -0.5], requires_grad=True)
    w.grad = torch.tensor([7.0, 7.0])
    make = lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.01)  # noqa: E731
    run = lambda: tar_gradient([w], lambda i: (w ** 2).sum(), lambda: w.sum(), lambda i: (w ** 3).sum(), 3, make,
                               1.0, tr_every=1)[0][0]  # noqa: E731
    first, second = run(), run()
    assert torch.equal(first, second) and torch.equal(w.grad, torch.tensor([7.0, 7.0]))
    assert torch.equal(w.detach(), torch.tensor([0.5, -0.5]))


def test_negative_entropy_matches_the_definition_on_supervised_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 2, 0]])
    probs = logits.softmax(-1)
    per_position = (probs * probs.log()).sum(-1)  # [2, 4]; position t predicts labels[:, t + 1]
    expected = (per_position[0, 0] + per_position[0, 1] + per_position[1, 1] + per_position[1, 2]) / 4
    assert float(negative_entropy(logits, labels)) == pytest.approx(float(expected), abs=1e-6)
    flat = torch.zeros(1, 3, 5)
    assert float(negative_entropy(flat, torch.tensor([[0, 1, 2]]))) == pytest.approx(-math.log(5), abs=1e-6)


def test_the_simulated_attack_lowers_the_harmful_loss_and_draws_fresh_batches():
    module = TAR(model="toy:tiny", inner_steps=4, inner_lrs=[1e-3], tr_every=2, optimizer="sgd", lr=1e-3)
    trainer = fit(module, steps=1)
    metrics = trainer.callback_metrics
    assert float(metrics["train/inner_harmful_last"]) < float(metrics["train/inner_harmful_first"])
    assert module.meta_rows and module.attack_rows
    assert not {id(r) for r in module.meta_rows} & {id(r) for r in module.attack_rows}  # held out
    fresh = [module.draw(module.attack_rows, k)["input_ids"] for k in range(2)]
    assert not torch.equal(fresh[0], fresh[1]) or fresh[0].shape != fresh[1].shape


def test_two_steps_change_the_weights_and_bad_arguments_are_user_errors():
    module = TAR(model="toy:tiny", inner_steps=2, inner_lrs=[1e-3, 3e-3], tr_every=1)
    before = params_of(module)
    trainer = fit(module, steps=2)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(module), before))
    assert {"train/L_TR", "train/L_retain", "train/loss", "train/inner_lr"} <= set(trainer.callback_metrics)
    with pytest.raises(UserError, match="inner_steps"):
        TAR(model="toy:tiny", inner_steps=0)
    with pytest.raises(UserError, match="lam_tr"):
        TAR(model="toy:tiny", lam_tr=-1.0)
    with pytest.raises(UserError, match="inner_lrs"):
        TAR(model="toy:tiny", inner_lrs=[])
    with pytest.raises(UserError, match="heldout_fraction"):
        TAR(model="toy:tiny", heldout_fraction=1.0)
    with pytest.raises(UserError, match="bf16-mixed"):
        fit(TAR(model="toy:tiny", inner_steps=1), precision="bf16-true")


def test_the_anchor_is_the_source_model_so_a_resume_anchors_where_an_unbroken_fit_does():
    """The representation term's original model is loaded again from the source, not copied from the weights at
    fit start (which, on a resume, are the checkpoint's)."""
    module = TAR(model="toy:tiny", inner_steps=1, tr_every=1, inner_lrs=[1e-3], lr=1e-2)
    fresh = [p.detach().clone() for p in module.model.parameters()]
    fit(module, steps=2)
    anchor = module.load_original()
    assert all(torch.equal(a, f) for a, f in zip(anchor.parameters(), fresh))
    assert any(not torch.equal(p.detach(), f) for p, f in zip(module.model.parameters(), fresh))
    assert not any(p.requires_grad for p in anchor.parameters())
