"""TAR: the first-order tamper-resistance gradient by hand on a quadratic, the entropy loss, and the module step."""
import math

import pytest
import torch

from helpers.alignment import Capture, first_batch, fit, params_of
from immunize.errors import UserError
from immunize.lightning_modules import TAR
from immunize.lightning_modules.tar import negative_entropy, tar_gradient


def test_tar_gradient_is_retain_plus_tamper_gradient_at_the_attacked_weights():
    """h = |w - a|^2 / 2, retain = |w - b|^2 / 2, L_TR = |w - d|^2 / 2: K SGD steps of size lr on h give
    w_K = a + (1 - lr)^K (w - a), so the gradient is (w - b) + lam (w_K - d)."""
    w = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    a, b, d = (torch.tensor(v, dtype=torch.float64) for v in ([1.0, 0.0, -1.0], [0.5, 0.5, 0.5], [2.0, -2.0, 0.0]))
    start = w.detach().clone()
    lr, lam, steps = 0.1, 2.5, 3
    grads, stats = tar_gradient([w], lambda: 0.5 * ((w - a) ** 2).sum(), lambda: 0.5 * ((w - b) ** 2).sum(),
                                lambda: 0.5 * ((w - d) ** 2).sum(), steps, lr, lam, tr_every=steps)
    attacked = a + (1 - lr) ** steps * (start - a)
    assert torch.allclose(grads[0], (start - b) + lam * (attacked - d), atol=1e-12)
    assert torch.equal(w.detach(), start)  # the inner attack is undone bit-exactly
    assert stats["harmful_last"] < stats["harmful_first"]


def test_tr_every_averages_the_tamper_gradient_along_the_attack():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    a, d = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    start, lr = w.detach().clone(), 0.5
    grads, _ = tar_gradient([w], lambda: 0.5 * ((w - a) ** 2).sum(), lambda: (w * 0).sum(),
                            lambda: 0.5 * ((w - d) ** 2).sum(), 4, lr, 1.0, tr_every=2)
    at = [a + (1 - lr) ** k * (start - a) for k in (2, 4)]
    assert torch.allclose(grads[0], sum(x - d for x in at) / 2, atol=1e-12)


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


def test_module_step_is_the_tar_gradient_of_its_batch():
    module = TAR(model="toy:tiny", inner_steps=2, inner_lr=1e-2, lam_tr=3.0, optimizer="sgd", lr=1e-3)
    batch = first_batch(module)
    params = module.trainable_parameters()
    expected, _ = module.step_gradient(batch)
    capture = Capture()
    fit(module, steps=1, callbacks=[capture])
    assert all(torch.allclose(g, e, atol=1e-6, rtol=1e-5) for g, e in zip(capture.grads[0], expected))
    assert len(params) == len(expected)


def test_two_steps_change_the_weights_and_bad_arguments_are_user_errors():
    module = TAR(model="toy:tiny", inner_steps=2)
    before = params_of(module)
    trainer = fit(module, steps=2)
    assert any(not torch.equal(a, b) for a, b in zip(params_of(module), before))
    assert {"train/L_TR", "train/L_retain", "train/loss"} <= set(trainer.callback_metrics)
    with pytest.raises(UserError, match="inner_steps"):
        TAR(model="toy:tiny", inner_steps=0)
    with pytest.raises(UserError, match="lam_tr"):
        TAR(model="toy:tiny", lam_tr=-1.0)
    with pytest.raises(UserError, match="bf16-mixed"):
        fit(TAR(model="toy:tiny"), precision="bf16-true")
