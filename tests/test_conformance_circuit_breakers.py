"""Conformance of immunize.lightning_modules.CircuitBreakers with its authors' code.

Reference: GraySwanAI/circuit-breakers, read from its public copies (the upstream snapshot could not be fetched here):
NexusSin/Llama-3-IHL-Circuit-Breakers-Testing-and-Compliance at ad4ff3d (src/lorra_circuit_breaker.py: compute_loss,
CustomTrainer.get_training_progress, train) and ks-fahad/CircuitBreakers (src/args.py, src/cb_train_dataset.py,
scripts/lorra_circuit_breaker_llama3_8b.sh). See docs/fidelity.md.

One training step is recomputed below the reference's way, in plain tensor code (no immunize loss, schedule or
hidden-state helper):
- the network is shortened as the reference loads it (config.num_hidden_layers = max(target_layers) + 1) and its
  `output_hidden_states` are read;
- originals: under the peft model's disable_adapter(), in eval mode, without gradient: every hidden state of the
  retain batch, zeroed at padding, and the circuit-breaker (harmful) batch's states at the target layers;
- retain loss: torch.norm(lora_hidden * mask - orig_hidden, dim=-1).nanmean() over all those states;
- circuit-breaker loss: relu(sum over the hidden dim of (h / |h|) (h_orig / |h_orig|) * mask) summed, divided by the
  attention mask repeated over the target layers (layers x tokens);
- progress = step / 300 (the reference's counter is 1 at the first step), retain_coeff = alpha progress,
  circuit_breaker_coeff = alpha (1 - progress), the circuit-breaker term skipped unless its coefficient is > 0.
The reference's norms take dtype=float (fp32 at least); here they stay in float64, the test's precision.
The batch is the project's triplet batch: harmful = prompt + harmful answer (attention mask over both, as the
reference's circuit-breaker mask covers request and response), retain = the benign rows then the refusal rows,
right-padded to the wider. With SGD (momentum 0, constant lr) in float64 the update is -lr * grad; compared to 1e-5.
toy:small (4 blocks) with target layers [1, 2]: two layers (the divisor counts them), block 3 never runs, and the
retain states end with the final norm of block 2's output, as the shortened network's do.
The LoRA B matrices are set to random values before the step: at LoRA's zero init the adapted and original states
are equal and the gradient is rounding noise (see test_circuit_breakers.py). LoRA dropout is 0 (the reference's 0.05
draws masks the test cannot replay).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from helpers.alignment import first_batch, float64_step
from helpers.reference import assert_update_is_sgd_step, gnorm
from immunize.lightning_modules import CircuitBreakers

TOL = 1e-5
LR = 1e-2
ALPHA = 10.0
TARGETS = [1, 2]
LORA = {"r": 4, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def retain_inputs(batch):
    """The benign rows then the refusal rows, right-padded to the wider (padding: attention 0)."""
    parts = [batch["benign"], batch["refusal"]]
    width = max(p["input_ids"].shape[1] for p in parts)
    ids = torch.cat([F.pad(p["input_ids"], (0, width - p["input_ids"].shape[1])) for p in parts])
    mask = torch.cat([F.pad(p["attention_mask"], (0, width - p["attention_mask"].shape[1])) for p in parts])
    return ids, mask


def reference_loss(model, batch, step, schedule_steps=300):
    """(loss, retain_coeff * retain_loss, circuit_breaker_coeff * circuit_breaker_loss) as the reference's
    compute_loss forms them (see the module docstring)."""
    config = model.get_base_model().config
    depth, config.num_hidden_layers = config.num_hidden_layers, max(TARGETS) + 1  # the reference's shortened network
    retain_ids, retain_mask = retain_inputs(batch)
    cb_ids, cb_mask = batch["harmful"]["input_ids"], batch["harmful"]["attention_mask"]
    retain = {"input_ids": retain_ids, "attention_mask": retain_mask, "output_hidden_states": True}
    cb = {"input_ids": cb_ids, "attention_mask": cb_mask, "output_hidden_states": True}

    progress = step / schedule_steps
    retain_coeff, cb_coeff = ALPHA * progress, ALPHA * (1 - progress)
    layers_cb_mask = cb_mask.repeat(len(TARGETS), 1, 1).unsqueeze(-1)
    with model.disable_adapter():
        model.eval()
        with torch.no_grad():
            orig_retain_outputs = model(**retain)["hidden_states"]
            assert len(orig_retain_outputs) == max(TARGETS) + 2
            orig_retain_hidden = torch.stack(orig_retain_outputs).detach()
            layers_retain_mask = retain_mask.repeat(len(orig_retain_outputs), 1, 1).unsqueeze(-1)
            orig_retain_hidden *= layers_retain_mask
            if cb_coeff > 0:
                cb_outputs = model(**cb)["hidden_states"]
                cb_hidden = torch.stack([cb_outputs[lay].detach() for lay in TARGETS])
    model.train()

    lora_retain_hidden = torch.stack(model(**retain)["hidden_states"]) * layers_retain_mask
    retain_loss = torch.norm(lora_retain_hidden - orig_retain_hidden, dim=-1, p=2).nanmean()
    cb_loss = torch.zeros((), dtype=retain_loss.dtype)
    if cb_coeff > 0:
        lora_cb_hidden = torch.stack([model(**cb)["hidden_states"][lay] for lay in TARGETS])
        normalized_lora = lora_cb_hidden / torch.norm(lora_cb_hidden, dim=-1, keepdim=True)
        normalized_orig = cb_hidden / torch.norm(cb_hidden, dim=-1, keepdim=True)
        inner_product = (normalized_lora * normalized_orig) * layers_cb_mask
        cb_loss = torch.relu(inner_product.sum(dim=-1)).sum() / layers_cb_mask.sum()
    config.num_hidden_layers = depth
    retain_term, cb_term = retain_coeff * retain_loss, cb_coeff * cb_loss
    return retain_term + cb_term, retain_term, cb_term


@functools.cache
def cb_step(schedule_steps: int):
    """One SGD step of CircuitBreakers from random LoRA B matrices: (fp64 model at the start, batch, update, module)."""
    torch.manual_seed(0)
    module = CircuitBreakers(model="toy:small", lora=LORA, alpha=ALPHA, target_layers=TARGETS,
                             schedule_steps=schedule_steps, optimizer="sgd", lr=LR, momentum=0.0, weight_decay=0.0,
                             scheduler="constant", warmup_ratio=0.0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name and p.requires_grad:
                p.normal_(0.0, 0.05)
    batch = first_batch(module)
    start, update = float64_step(module, batch)
    return start, batch, update, module


def check(schedule_steps: int) -> tuple[float, float]:
    """Asserts the module's update is -lr * the reference gradient; returns each term's share of that gradient."""
    start, batch, update, module = cb_step(schedule_steps)
    params = [p for p in start.parameters() if p.requires_grad]
    assert len(params) == len(module.trainable_parameters())
    loss, retain_term, cb_term = reference_loss(start, batch, step=1, schedule_steps=schedule_steps)
    grad = torch.autograd.grad(loss, params, retain_graph=True)
    assert_update_is_sgd_step(update, grad, LR, TOL)
    shares = []
    for term in (retain_term, cb_term):
        g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True) if term.requires_grad else []
        g = [torch.zeros_like(p) if x is None else x for x, p in zip(g, params)] or [torch.zeros_like(p) for p in params]
        shares.append(float(gnorm(g) / gnorm(grad)))
    return shares[0], shares[1]


def test_update_matches_reference_at_the_first_step():
    """schedule_steps 300 (the reference's constant): p = 1/300, the rerouting term dominates."""
    retain_share, cb_share = check(300)
    assert cb_share > 0.5 and retain_share > 100 * TOL


def test_update_matches_reference_half_way():
    """schedule_steps 2: p = 1/2, both terms weigh alpha / 2 and both are far above the tolerance."""
    retain_share, cb_share = check(2)
    assert retain_share > 0.05 and cb_share > 0.05


def test_update_matches_reference_once_the_rerouting_term_is_off():
    """schedule_steps 1: p = 1, the reference's circuit_breaker_coeff is 0 and only the retain term is left."""
    retain_share, cb_share = check(1)
    assert cb_share == 0.0 and abs(retain_share - 1.0) < TOL
