"""Circuit Breakers: its losses and schedule on hand-made tensors, the cut network's hidden states, the module's
rules (LoRA required, target layers, frozen blocks) and a short fit on toy triplets that reroutes the harmful
representations while the retain representations stay close."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers.alignment import first_batch, fit
from immunize.errors import UserError
from immunize.lightning_modules import CircuitBreakers
from immunize.lightning_modules.circuit_breakers import check_target_layers, default_target_layers
from immunize.lightning_modules.functional.batch_parts import concat_parts
from immunize.lightning_modules.functional.rerouting import (masked_cosine, rerouting_coefficients, rerouting_loss,
                                                             retain_loss)
from immunize.lightning_modules.modeling.truncated_forward import truncated_hidden_states

LORA = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def states(*rows):
    """One layer [B=1, T, H] from T hidden vectors."""
    return torch.tensor([list(rows)], dtype=torch.float32)


# ----- the losses on hand-made tensors ---------------------------------------------------------------------
def test_rerouting_loss_is_the_mean_relu_cosine_over_layers_and_unmasked_tokens():
    orig = [states([1.0, 0.0], [0.0, 2.0], [3.0, 3.0]), states([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])]
    # layer 0: cos 1 (same), cos -1 (opposite: ReLU 0), masked; layer 1: cos 0.6, cos 0 (orthogonal), masked
    cur = [states([5.0, 0.0], [0.0, -1.0], [-3.0, -3.0]), states([3.0, 4.0], [7.0, 0.0], [-1.0, 0.0])]
    mask = torch.tensor([[1, 1, 0]])
    assert float(rerouting_loss(cur, orig, mask)) == pytest.approx((1.0 + 0.0 + 0.6 + 0.0) / (2 * 2))
    assert float(masked_cosine(cur, orig, mask)) == pytest.approx((1.0 - 1.0 + 0.6 + 0.0) / 4)
    assert float(rerouting_loss(orig, orig, mask)) == pytest.approx(1.0)  # the start: every cosine is 1
    assert float(rerouting_loss(cur, orig, torch.zeros(1, 3))) == 0.0  # no tokens: 0, not NaN


def test_rerouting_loss_ignores_padding_even_where_a_state_is_zero():
    orig, cur = [states([1.0, 1.0], [0.0, 0.0])], [states([1.0, 1.0], [0.0, 0.0])]
    loss = rerouting_loss(cur, orig, torch.tensor([[1, 0]]))
    assert math.isfinite(float(loss)) and float(loss) == pytest.approx(1.0)


def test_retain_loss_is_the_norm_of_the_difference_averaged_over_every_position():
    orig = [states([0.0, 0.0], [1.0, 1.0]), states([1.0, 1.0], [2.0, 2.0])]
    cur = [states([3.0, 4.0], [9.0, 9.0]), states([1.0, 1.0], [2.0, 2.0])]  # norms 5 and (padding) 0; layer 1: 0, 0
    mask = torch.tensor([[1, 0]])
    assert float(retain_loss(cur, orig, mask)) == pytest.approx(5.0 / 4)  # layers x rows x positions, padding as 0
    assert float(retain_loss(orig, orig, mask)) == 0.0
    # its gradient at the start (current == original) is the norm's 0 subgradient, not NaN
    x = orig[0].clone().requires_grad_(True)
    retain_loss([x], orig[:1], mask).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_coefficients_follow_step_over_schedule_steps():
    assert rerouting_coefficients(1, 10.0, 300) == pytest.approx((10.0 * 299 / 300, 10.0 / 300))
    assert rerouting_coefficients(150, 10.0, 300) == pytest.approx((5.0, 5.0))  # the reference's last step
    assert rerouting_coefficients(300, 10.0, 300) == pytest.approx((0.0, 10.0))
    assert rerouting_coefficients(450, 10.0, 300) == pytest.approx((0.0, 15.0))  # p is not capped
    with pytest.raises(ValueError):
        rerouting_coefficients(0, 10.0, 300)


def test_concat_parts_pads_the_narrower_part():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]),
         "labels": torch.tensor([[-100, 6, 7]])}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.tensor([[1]]), "labels": torch.tensor([[8]])}
    out = concat_parts([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ----- target layers and the cut network -------------------------------------------------------------------
def test_default_and_checked_target_layers():
    assert default_target_layers(2) == [1] and default_target_layers(4) == [1, 3]
    assert default_target_layers(32) == [11, 21]
    with pytest.raises(UserError, match="2 or more"):
        default_target_layers(1)
    assert check_target_layers([20, 10], 32) == [10, 20]
    for bad in ([0], [32], [3, 3], [1.5], []):
        with pytest.raises(UserError, match="target_layers"):
            check_target_layers(bad, 32)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return CircuitBreakers(model="toy:small", lora=LORA, target_layers=[1, 2])


def test_truncated_hidden_states_are_those_of_the_shortened_model(small):
    part = first_batch(small)["harmful"]
    base = copy.deepcopy(small.model.get_base_model()).eval()
    small.model.eval()
    try:
        for n in (1, 3, 4):
            base.config.num_hidden_layers = n  # the reference's way: load the model with fewer layers
            ref = base.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                             output_hidden_states=True, use_cache=False).hidden_states
            ours = truncated_hidden_states(small.model, part, n)
            assert len(ours) == len(ref) == n + 1
            assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, ref))
        raw = truncated_hidden_states(small.model, part, 3, final_norm=False)  # block 2's output as it is
        assert len(raw) == 4 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(raw, ref[:4]))
    finally:
        small.model.train()


def test_lora_after_the_last_target_layer_is_frozen(small):
    assert small.target_layers == [1, 2] and small.kept_blocks == 3
    layers = small.model.get_base_model().model.layers

    def lora_of(layer):
        return [p for name, p in layer.named_parameters() if "lora_" in name]

    kept = [p for layer in layers[:3] for p in lora_of(layer)]
    assert kept and all(p.requires_grad for p in kept)
    assert lora_of(layers[3]) and not any(p.requires_grad for p in layers[3].parameters())
    assert {id(p) for p in small.trainable_parameters()} == {id(p) for p in kept}
    batch = first_batch(small)
    small.originals(batch["harmful"], batch["refusal"])  # peft's disable_adapter() turns every adapter back on
    assert {id(p) for p in small.trainable_parameters()} == {id(p) for p in kept}


def test_it_needs_lora_and_says_so_in_one_line():
    with pytest.raises(UserError, match="LoRA") as err:
        CircuitBreakers(model="toy:tiny")
    assert "\n" not in str(err.value)
    for bad in ({"alpha": 0.0}, {"schedule_steps": 0}, {"retain": ["harmful"]}, {"retain": []}):
        with pytest.raises(UserError, match="CircuitBreakers"):
            CircuitBreakers(model="toy:tiny", lora=LORA, **bad)


def test_the_zero_initialised_adapter_starts_at_the_maximum_of_the_rerouting_loss():
    """LoRA's B = 0: current == original, cos = 1 (its maximum) and the retain norm at its kink, so the first gradient
    is rounding noise (Adam's normalisation turns it into a full step; plain SGD would stay)."""
    torch.manual_seed(0)
    module = CircuitBreakers(model="toy:tiny", lora={**LORA, "lora_dropout": 0.0})
    batch = first_batch(module)
    loss, logs = module.defense_loss(batch)
    assert float(logs["cb_cos"]) == pytest.approx(1.0, abs=1e-6) and float(logs["retain"]) == pytest.approx(0.0, abs=1e-6)
    grads = torch.autograd.grad(loss, module.trainable_parameters(), allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-5


# ----- a short fit -------------------------------------------------------------------------------------------
def cosines(module, batch) -> tuple[float, float]:
    """(harmful cosine at the target layers, retain cosine over the cut network's states) to the original model."""
    retain = module.retain_batch(batch)
    module.model.eval()
    with torch.no_grad():
        harmful_orig, retain_orig = module.originals(batch["harmful"], retain)
        harmful_now, retain_now = module.harmful_states(batch["harmful"]), module.retain_states(retain)
    module.model.train()
    return (float(masked_cosine(harmful_now, harmful_orig, batch["harmful"]["attention_mask"])),
            float(masked_cosine(retain_now, retain_orig, retain["attention_mask"])))


def test_a_short_fit_reroutes_harmful_states_and_keeps_retain_states():
    """14 steps on toy triplets (a randomly initialised toy:tiny, so harmful and benign inputs share most features):
    the harmful states at the target layer turn well away from the original's, the retain states several times less
    (seeds 0-3 measured: harmful cosine 0.36-0.48, retain 0.90-0.94)."""
    torch.manual_seed(0)
    module = CircuitBreakers(model="toy:tiny", lora=LORA, alpha=10.0, schedule_steps=28, lr=1e-2)
    batch = first_batch(module, batch_size=8, limit=16)
    assert cosines(module, batch) == pytest.approx((1.0, 1.0), abs=1e-6)
    trainer = fit(module, steps=14, batch_size=8, limit=64)
    metrics = trainer.callback_metrics
    assert float(metrics["train/c_rr"]) == pytest.approx(5.0) and float(metrics["train/c_retain"]) == pytest.approx(5.0)
    harmful, retain = cosines(module, batch)
    assert harmful < 0.7 and 1 - harmful > 3 * (1 - retain), (harmful, retain)


def test_past_schedule_steps_only_the_retain_term_is_left():
    torch.manual_seed(0)
    module = CircuitBreakers(model="toy:tiny", lora=LORA, alpha=2.0, schedule_steps=1)
    trainer = fit(module, steps=1)
    metrics = trainer.callback_metrics
    assert "train/rr" not in metrics and float(metrics["train/c_rr"]) == 0.0
    assert float(metrics["train/loss"]) == pytest.approx(2.0 * float(metrics["train/retain"]))
