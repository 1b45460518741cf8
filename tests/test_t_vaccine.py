"""T-Vaccine: layer probabilities from harmful hidden-state gradients by hand, seeded layer draws, perturbation only
at the active layers, and frozen layers that do not move."""
import pytest
import torch

from helpers.alignment import ce, first_batch, fit, params_of
from immunize.errors import UserError
from immunize.lightning_modules import TVaccine
from immunize.lightning_modules.modeling.hidden_hooks import capture_outputs, decoder_layers
from immunize.lightning_modules.t_vaccine import layer_probabilities, sample_layers


def test_layer_probabilities_are_the_normalised_harmful_gradient_norms():
    module = TVaccine(model="toy:tiny", active_layers=1)
    batch = first_batch(module)
    attention = [layer.self_attn for layer in decoder_layers(module.model)]  # the reference's sites
    with capture_outputs(attention) as hidden:
        loss = ce(module.model, batch["harmful"])
    norms = torch.stack([g.norm() for g in torch.autograd.grad(loss, hidden)])
    grads, _ = module.hidden_gradients(batch["harmful"], module.all_sites())
    assert torch.allclose(layer_probabilities(grads), norms / norms.sum(), atol=1e-6)
    assert float(layer_probabilities([torch.zeros(2), torch.zeros(3)]).sum()) == pytest.approx(1.0)


def test_layer_draws_follow_the_probabilities_and_the_seed():
    p = torch.tensor([0.7, 0.2, 0.1, 0.0])
    draws = [sample_layers(p, 1, seed) for seed in range(400)]
    share = sum(d == [0] for d in draws) / len(draws)
    assert 0.6 < share < 0.8 and all(d != [3] for d in draws)
    assert sample_layers(p, 2, 5) == sample_layers(p, 2, 5) and len(set(sample_layers(p, 2, 5))) == 2
    assert sorted(sample_layers(p, 4, 1)) == [0, 1, 2, 3]  # a zero-probability layer is still drawn to fill


@pytest.mark.parametrize("freeze", ["attention", "layer"])
def test_only_the_active_layers_are_perturbed_and_the_frozen_set_does_not_move(freeze):
    """freeze "attention" (the reference): the inactive layers' self-attention weights stay, everything else trains;
    freeze "layer": only the active decoder layers train."""
    module = TVaccine(model="toy:tiny", active_layers=1, resample_every=100, probability_every=100, lr=1e-2,
                      freeze=freeze)
    names = {id(p): n for n, p in module.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = fit(module, steps=1)
    (active,) = module.active
    assert len(module.sites()) == 1 and module.sites()[0] is module.all_sites()[active]
    assert module.sites()[0] is decoder_layers(module.model)[active].self_attn  # the reference's site
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    frozen = {names[id(p)] for p in module.frozen_parameters()}
    inactive_attention = {names[id(p)] for i, layer in enumerate(decoder_layers(module.model)) if i != active
                          for p in layer.self_attn.parameters()}
    in_active = {names[id(p)] for p in decoder_layers(module.model)[active].parameters()}
    assert moved and not moved & frozen
    if freeze == "attention":
        assert frozen == inactive_attention
        assert moved == set(names.values()) - frozen  # MLPs of every layer, embeddings and head train
    else:
        assert moved <= in_active and frozen == set(names.values()) - in_active
    state = trainer.optimizers[0].state  # AdamW kept no state for the frozen tensors: they had no gradient
    assert not any(p in state for p in module.frozen_parameters())


def test_two_steps_finite_and_bad_arguments():
    module = TVaccine(model="toy:tiny", active_layers=2, resample_every=1, probability_every=1)
    before = params_of(module)
    trainer = fit(module, steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(a, b) for a, b in zip(params_of(module), before))
    with pytest.raises(UserError, match="active_layers"):
        TVaccine(model="toy:tiny", active_layers=0)
    with pytest.raises(UserError, match="rho"):
        TVaccine(model="toy:tiny", rho=-1.0)
