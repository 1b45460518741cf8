"""Alignment-stage baselines (adversarial loss, RepNoise, Vaccine, Booster): each defining computation against a
hand-computed reference on toy:tiny, 2-step fits that stay finite, and DDP ranks that stay identical."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from immunize.errors import UserError
from lightning_modules import AdversarialImmunization, Booster, RepNoise, Vaccine
from lightning_modules.booster import booster_gradient
from lightning_modules.grad_math import global_norm, grads_of
from lightning_modules.logit_lens import logit_lens_ce
from lightning_modules.mmd import mmd2, noise_mmd
from helpers.alignment import Capture, ce, first_batch, fit, params_of, rel_err, run, write_ddp_config


# ----- MMD (RepNoise's L_noise) ------------------------------------------------------------------------
def test_mmd2_matches_a_hand_computed_value():
    """x = {0, 2}, y = {0, 0} in 1-D. Pooled squared distances: 4 between the 2 and each 0 (6 of the 12 ordered
    distinct pairs), else 0: mean b = 24 / 12 = 2, bandwidths b/4 .. 4b = 0.5, 1, 2, 4, 8. With
    s = k(d^2 = 4) = e^-8 + e^-4 + e^-2 + e^-1 + e^-0.5 and k(0) = 5: mean K_xx = (10 + 2s) / 4, mean K_yy = 5,
    mean K_xy = (10 + 2s) / 4, so MMD^2 = 5 - (5 + s) / 2 = (5 - s) / 2."""
    s = sum(math.exp(-4.0 / b) for b in (0.5, 1.0, 2.0, 4.0, 8.0))
    value = mmd2(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [0.0]]))
    assert float(value) == pytest.approx((5.0 - s) / 2.0, rel=1e-6)
    assert float(value) == pytest.approx(1.9358021, rel=1e-6)


def test_mmd2_single_bandwidth_unequal_sizes_and_identity():
    """One kernel (bandwidth = mean distinct-pair distance): x = {(0,0)}, y = {(3,0), (0,4)}. Pooled squared
    distances 9, 16, 25 (each twice): b = 100 / 6. MMD^2 = 1 + (2 + 2 e^{-25/b}) / 4 - 2 (e^{-9/b} + e^{-16/b}) / 2."""
    b = 100.0 / 6.0
    expected = 1.0 + (2.0 + 2.0 * math.exp(-25.0 / b)) / 4.0 - (math.exp(-9.0 / b) + math.exp(-16.0 / b))
    x, y = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert float(mmd2(x, y, kernel_num=1)) == pytest.approx(expected, rel=1e-6)
    z = torch.randn(5, 7, dtype=torch.float64)
    assert float(mmd2(z, z)) == pytest.approx(0.0, abs=1e-12)


def test_noise_mmd_ignores_masked_positions():
    hidden = torch.randn(3, 4, 5)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    other = hidden.clone()
    other[~mask] = 100.0  # prompt/padding activations must not matter
    a = noise_mmd(hidden, mask, generator=torch.Generator().manual_seed(1))
    b = noise_mmd(other, mask, generator=torch.Generator().manual_seed(1))
    assert float(a) == float(b) and float(a) > 0


# ----- adversarial loss --------------------------------------------------------------------------------
def test_adversarial_loss_is_refusal_ce_minus_alpha_harmful_ce():
    module = AdversarialImmunization(model="toy:tiny", alpha=0.3)
    batch = first_batch(module)
    with torch.no_grad():
        loss, _, _ = module.adversarial_loss(batch)
        expected = ce(module.model, batch["refusal"]) - 0.3 * ce(module.model, batch["harmful"])
        assert float(ce(module.model, batch["harmful"])) > 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


# ----- RepNoise ----------------------------------------------------------------------------------------
def test_repnoise_terms_match_the_plain_functions():
    """CE on refusals, mean over layers of MMD^2(masked MLP outputs, noise), and H from the shared logit lens."""
    module = RepNoise(model="toy:tiny", alpha=1.0, beta=1e-3)
    batch = first_batch(module)
    harmful, model = batch["harmful"], module.model
    torch.manual_seed(7)
    ce_refusal, l_noise, h = module.repnoise_terms(batch)

    mlp_out = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, out: mlp_out.append(out)) for layer in model.model.layers]
    out = run(model, harmful, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    mask = (harmful["labels"] != -100).unsqueeze(-1).float()
    torch.manual_seed(7)
    noise = [mmd2((a * mask).flatten(1), (torch.randn(a.shape) * mask).flatten(1)) for a in mlp_out]
    assert len(noise) == 2
    assert float(l_noise) == pytest.approx(float(torch.stack(noise).mean()), rel=1e-5)
    lens = logit_lens_ce(out.hidden_states, out.logits, harmful["labels"], model.lm_head, model.model.norm)
    assert float(h) == pytest.approx(float(lens), rel=1e-6)
    assert float(ce_refusal) == pytest.approx(float(ce(model, batch["refusal"])), rel=1e-6)


# ----- Vaccine -----------------------------------------------------------------------------------------
def _site_modules(model, site):
    layers = list(model.model.layers)
    return layers if site == "layer" else [layer.self_attn for layer in layers]


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def vaccine_by_hand(model, part, rho, site):
    """(eps per site, gradient of the perturbed loss): hooks written here, independent of hidden_hooks."""
    model = copy.deepcopy(model)
    sites = _site_modules(model, site)
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: outs.__setitem__(i, _first(out))) for i, m in enumerate(sites)]
    grads = torch.autograd.grad(ce(model, part), [outs[i] for i in range(len(sites))])
    for hook in hooks:
        hook.remove()
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    eps = [(g.double() * rho / norm).float() for g in grads]

    def add(i):
        def hook(mod, a, out):
            return out + eps[i] if isinstance(out, torch.Tensor) else (out[0] + eps[i], *out[1:])
        return hook

    hooks = [m.register_forward_hook(add(i)) for i, m in enumerate(sites)]
    params = [p for p in model.parameters() if p.requires_grad]
    grad = grads_of(ce(model, part), params)
    for hook in hooks:
        hook.remove()
    return eps, grad


@pytest.mark.parametrize("site", ["layer", "attention"])
def test_vaccine_perturbation_is_rho_g_over_norm(site):
    module = Vaccine(model="toy:tiny", rho=2.0, site=site)
    part = first_batch(module)["refusal"]
    eps, _, norm = module.hidden_perturbation(part)
    expected, _ = vaccine_by_hand(module.model, part, 2.0, site)
    assert len(eps) == len(expected) == 2 and float(norm) > 0
    for e, x in zip(eps, expected):
        assert e.shape == x.shape
        assert float((e - x).abs().max()) <= 1e-5 * float(x.abs().max())
    assert float(global_norm(eps)) == pytest.approx(2.0, rel=1e-5)


def test_vaccine_update_is_the_gradient_at_the_perturbed_hidden_states():
    module = Vaccine(model="toy:tiny", rho=2.0, optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    part = capture.batches[0]["refusal"]
    _, expected = vaccine_by_hand(reference, part, 2.0, "layer")
    clean = grads_of(ce(reference, part), [p for p in reference.parameters() if p.requires_grad])
    assert rel_err(capture.grads[0], expected) < 1e-5
    assert rel_err(clean, expected) > 1e-3  # the perturbation changes the gradient measurably


# ----- Booster -----------------------------------------------------------------------------------------
def booster_by_hand(model, batch, lam, alpha):
    harmful, refusal = batch["harmful"], batch["refusal"]
    params = [p for p in model.parameters() if p.requires_grad]
    g_h = grads_of(ce(model, harmful), params)
    moved = copy.deepcopy(model)
    norm = global_norm(g_h)
    with torch.no_grad():
        for p, g in zip([p for p in moved.parameters() if p.requires_grad], g_h):
            p.sub_(alpha * g / norm)
    g_moved = grads_of(ce(moved, harmful), [p for p in moved.parameters() if p.requires_grad])
    g_align = grads_of(ce(model, refusal), params)
    return [a + lam * (h - m) for a, h, m in zip(g_align, g_h, g_moved)], g_align


def test_booster_applied_gradient_is_align_plus_lam_harmful_difference():
    module = Booster(model="toy:tiny", lam=5.0, alpha=0.1, optimizer="sgd", lr=1e-2)
    reference = copy.deepcopy(module.model)
    capture = Capture()
    fit(module, callbacks=[capture])
    expected, g_align = booster_by_hand(reference, capture.batches[0], 5.0, 0.1)
    assert rel_err(capture.grads[0], expected) < 1e-5
    assert rel_err(g_align, expected) > 1e-2  # the correction term matters


def test_booster_gradient_restores_the_weights_bit_exactly():
    module = Booster(model="toy:tiny")
    batch = first_batch(module)
    params = module.trainable_parameters()
    before = params_of(module)
    grads, stats = booster_gradient(lambda: ce(module.model, batch["harmful"]), lambda: ce(module.model, batch["refusal"]),
                                    params, alpha=0.1, lam=5.0)
    assert all(torch.equal(a, b) for a, b in zip(params_of(module), before))
    assert stats["h_perturbed"] < stats["h"]  # the simulated harmful step lowers the harmful loss
    assert all(torch.isfinite(g).all() for g in grads)
    plain, none = booster_gradient(lambda: 1 / 0, lambda: ce(module.model, batch["refusal"]), params, alpha=0.1, lam=0.0)
    assert none == {} and rel_err(plain, grads_of(ce(module.model, batch["refusal"]), params)) == 0.0


# ----- every method trains -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kwargs, logged", [
    (AdversarialImmunization, {}, {"train/ce_refusal", "train/ce_harmful"}),
    (RepNoise, {}, {"train/ce_refusal", "train/L_noise", "train/H"}),
    (Vaccine, {}, {"train/clean_loss", "train/hidden_grad_norm"}),
    (Booster, {"grad_clip": 1.0}, {"train/L_align", "train/h", "train/h_perturbed"}),
])
def test_two_training_steps_stay_finite(cls, kwargs, logged):
    module = cls(model="toy:tiny", **kwargs)
    before = params_of(module)
    trainer = fit(module, steps=2)
    assert trainer.global_step == 2
    after = params_of(module)
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    metrics = trainer.callback_metrics
    assert logged | {"train/loss"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in logged | {"train/loss"})


def test_bad_arguments_and_precision_are_user_errors():
    with pytest.raises(UserError, match="alpha"):
        AdversarialImmunization(model="toy:tiny", alpha=-1.0)
    with pytest.raises(UserError, match="beta"):
        RepNoise(model="toy:tiny", beta=float("nan"))
    with pytest.raises(UserError, match="site"):
        Vaccine(model="toy:tiny", site="mlp")
    with pytest.raises(UserError, match="lam"):
        Booster(model="toy:tiny", lam=-5.0)
    with pytest.raises(UserError, match="bf16-mixed"):
        fit(Booster(model="toy:tiny"), precision="bf16-true")
    module = AdversarialImmunization(model="toy:tiny")
    with pytest.raises(UserError, match="triplets"):
        module.training_step({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, 0)


# ----- DDP ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Booster", "Vaccine"])
def test_ddp_two_ranks_match_each_other_and_one_process(tmp_path, cli, name):
    """2 ranks x batch 2 vs 1 process x batch 4 on a 4-triplet set: every step sees the whole set.

    Booster: g_h is all-reduced before its norm, so both ranks take the same harmful step and the same
    update (manual optimization, no DDP reducer). Vaccine: each rank perturbs its own samples with one
    global norm (a scalar all-reduce), so the update equals the single-process one (DDP averages the grads).
    """
    steps = 3
    init = {"model": "toy:tiny", "optimizer": "sgd", "lr": 0.5, "scheduler": "cosine", "warmup_ratio": 0.2}
    dump = tmp_path / "dump"
    path = write_ddp_config(tmp_path, name, init, steps, dump)
    result = cli("fit", "--config", str(path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert max(float((ranks[0][k] - ranks[1][k]).abs().max()) for k in ranks[0]) == 0.0

    single = {"Booster": Booster, "Vaccine": Vaccine}[name](**init)
    initial = {f"model.{n}": p.detach().clone() for n, p in single.model.named_parameters()}
    fit(single, steps=steps, batch_size=4, limit=4)
    names = {f"model.{n}": p.detach() for n, p in single.model.named_parameters()}
    diff = max(float((ranks[0][k] - names[k]).abs().max()) for k in ranks[0])
    moved = max(float((names[k] - initial[k]).abs().max()) for k in names)
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)
