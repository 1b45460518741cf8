"""The baselines on their bases (OneLossDefense, MultiPassDefense): two finite steps with their
logged terms, bad arguments and precisions, and DDP ranks that match each other and one process."""
from __future__ import annotations


import pytest
import torch

from immunize.errors import UserError
from immunize.lightning_modules import AdversarialImmunization, Booster, RepNoise, Vaccine
from helpers.ranks import assert_ranks_identical
from helpers.alignment import fit, params_of, write_ddp_config


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
    rank0 = assert_ranks_identical(dump)

    single = {"Booster": Booster, "Vaccine": Vaccine}[name](**init)
    initial = {f"model.{n}": p.detach().clone() for n, p in single.model.named_parameters()}
    fit(single, steps=steps, batch_size=4, limit=4)
    names = {f"model.{n}": p.detach() for n, p in single.model.named_parameters()}
    diff = max(float((rank0[k] - names[k]).abs().max()) for k in rank0)
    moved = max(float((names[k] - initial[k]).abs().max()) for k in names)
    assert diff < 1e-5 and moved > 1e-2, (diff, moved)
