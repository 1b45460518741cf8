"""Circuit Breakers (representation rerouting, RR): LoRA that sends harmful representations away from where they were.

Per step, on a triplet batch ({harmful, refusal, benign}):
- originals: the same network with its LoRA adapter switched off (peft's disable_adapter, eval mode, no gradient);
- L_rr on the harmful part (prompt + harmful answer, every non-padding token): mean over the target layers and
  tokens of ReLU(cos(h, h_orig)) (functional.rerouting.rerouting_loss);
- L_retain on the retain parts (default benign and refusal, stacked): mean over layers x rows x positions of
  |h - h_orig|_2, padding zeroed, over every hidden state of the network cut after the last target layer
  (functional.rerouting.retain_loss; modeling.truncated_forward);
- loss = c_rr L_rr + c_retain L_retain with p = step / schedule_steps, c_rr = alpha (1 - p), c_retain = alpha p
  (functional.rerouting.rerouting_coefficients); the rerouting term is skipped once c_rr reaches 0.
Target layers are Hugging Face hidden_states indices (l: the output of the l-th block, counting from 1).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from immunize.errors import UserError
from immunize.lightning_modules.functional.batch_parts import concat_parts, require_parts
from immunize.lightning_modules.functional.global_batch import count_weights
from immunize.lightning_modules.functional.rerouting import (masked_cosine, rerouting_coefficients, rerouting_loss,
                                                             retain_loss)
from immunize.lightning_modules.modeling.hidden_hooks import decoder_layers
from immunize.lightning_modules.modeling.truncated_forward import truncated_hidden_states
from immunize.lightning_modules.one_loss import OneLossDefense

RETAIN_PARTS = ("benign", "refusal")
REFERENCE_LORA = ("{r: 16, lora_alpha: 16, lora_dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj, "
                  "gate_proj, up_proj, down_proj]}")


def default_target_layers(depth: int) -> list[int]:
    """round(depth / 3) and round(2 depth / 3), kept in 1 .. depth - 1 (2 blocks: [1]; 4: [1, 3]; 32: [11, 21])."""
    if depth < 2:
        raise UserError(f"CircuitBreakers needs a model with 2 or more decoder blocks, this one has {depth}")
    return sorted({min(max(round(k * depth / 3), 1), depth - 1) for k in (1, 2)})


def check_target_layers(layers: Sequence[int], depth: int) -> list[int]:
    """The target layers sorted, or a one-line UserError unless they are distinct integers in 1 .. depth - 1."""
    if not layers or any(isinstance(t, bool) or not isinstance(t, int) for t in layers) or len(set(layers)) != len(layers):
        raise UserError(f"CircuitBreakers target_layers must be distinct integers, got {list(layers)!r}")
    if not all(1 <= t <= depth - 1 for t in layers):
        raise UserError(f"CircuitBreakers target_layers must lie in 1..{depth - 1} (hidden_states indices of this "
                        f"{depth}-block model), got {list(layers)}")
    return sorted(layers)


class CircuitBreakers(OneLossDefense):
    """Automatic optimization (Lightning's clipping and accumulation flags apply); LoRA only.

    The step counter of the schedule is the optimizer step (1 at the first step), as the reference's with its
    gradient_accumulation_steps 1. DDP: each term is weighted by the rank's share of the global batch's tokens
    (L_rr) or positions (L_retain), so the update is the global batch's. LoRA adapters of blocks after the last
    target layer get no gradient and are frozen (the reference puts LoRA on blocks 0 .. max(target_layers) only).
    Zou et al., "Improving Alignment and Robustness with Circuit Breakers" (NeurIPS 2024), Algorithm 1.

    Args:
        target_layers: hidden_states indices whose harmful representations are rerouted (the reference: 10 and 20
            on 32-block models); null: round(depth / 3) and round(2 depth / 3), e.g. [1] on toy:tiny's 2 blocks.
        alpha: the coefficients' scale (the reference's lorra_alpha: default 5; its Llama-3-8B script uses 10).
        schedule_steps: p = step / schedule_steps (the reference hard-codes 300; with its 150 steps p ends at 0.5).
        retain: the batch parts stacked into the retain batch (benign and/or refusal; the reference's Llama-3 retain
            set is general chat plus refusals of harmful requests).
        **kwargs: CausalLMModule's arguments; `lora` is required (the reference's: r 16, lora_alpha 16, dropout 0.05
            on q, k, v, o, gate, up and down projections).
    """

    loss_name = "Circuit Breakers loss"

    def __init__(self, target_layers: list[int] | None = None, alpha: float = 5.0, schedule_steps: int = 300,
                 retain: Sequence[str] = RETAIN_PARTS, **kwargs):
        if kwargs.get("lora") is None and kwargs.get("adapter", "merge") != "continue":
            raise UserError("CircuitBreakers trains LoRA adapters (its original representations are the model's with "
                            f"the adapter switched off); set model.init_args.lora, e.g. {REFERENCE_LORA}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise UserError(f"CircuitBreakers alpha must be a finite number > 0, got {alpha}")
        if isinstance(schedule_steps, bool) or not isinstance(schedule_steps, int) or schedule_steps < 1:
            raise UserError(f"CircuitBreakers schedule_steps must be an integer >= 1, got {schedule_steps!r}")
        retain = tuple(retain)
        if not retain or len(set(retain)) != len(retain) or not set(retain) <= set(RETAIN_PARTS):
            raise UserError(f"CircuitBreakers retain must be distinct parts among {list(RETAIN_PARTS)}, got {list(retain)}")
        super().__init__(**kwargs)
        if not hasattr(self.model, "disable_adapter"):
            raise UserError("CircuitBreakers needs a LoRA adapter on the model; set model.init_args.lora")
        self.alpha, self.schedule_steps, self.retain = float(alpha), schedule_steps, retain
        layers = decoder_layers(self.model)
        self.target_layers = (default_target_layers(len(layers)) if target_layers is None
                              else check_target_layers(list(target_layers), len(layers)))
        self.kept_blocks = max(self.target_layers) + 1  # the reference's network is cut after this many blocks
        self.freeze_uncut_blocks()

    def freeze_uncut_blocks(self) -> None:
        """No gradient for the blocks after the cut (their LoRA adapters never run). Called again after every
        disable_adapter(): peft turns requires_grad back on for all adapters when it enables them."""
        for layer in decoder_layers(self.model)[self.kept_blocks:]:
            layer.requires_grad_(False)

    def harmful_states(self, part: dict) -> list[torch.Tensor]:
        """The hidden states at the target layers (the blocks after the last target layer are not run)."""
        states = truncated_hidden_states(self.model, part, max(self.target_layers), final_norm=False)
        return [states[t] for t in self.target_layers]

    def retain_states(self, part: dict) -> list[torch.Tensor]:
        """Every hidden state of the network cut after kept_blocks blocks (its last one through the final norm)."""
        return truncated_hidden_states(self.model, part, self.kept_blocks)

    def originals(self, harmful: dict | None, retain: dict):
        """(harmful target states or None, retain states) with the adapter switched off, in eval mode, no gradient."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter(), torch.no_grad():
                return (None if harmful is None else self.harmful_states(harmful)), self.retain_states(retain)
        finally:
            self.model.train(was_training)
            self.freeze_uncut_blocks()

    def retain_batch(self, batch: dict) -> dict:
        parts = [batch[name] for name in self.retain]
        return parts[0] if len(parts) == 1 else concat_parts(parts, self.tokenizer.pad_token_id)

    def defense_loss(self, batch):
        harmful = require_parts(batch, ("harmful", *self.retain), "CircuitBreakers")[0]
        retain = self.retain_batch(batch)
        c_rr, c_retain = rerouting_coefficients(self.global_step + 1, self.alpha, self.schedule_steps)
        w_rr, w_retain = count_weights([harmful["attention_mask"].sum(), retain["attention_mask"].numel()])
        harmful_orig, retain_orig = self.originals(harmful if c_rr > 0 else None, retain)
        retain_now = self.retain_states(retain)
        l_retain = retain_loss(retain_now, retain_orig, retain["attention_mask"])
        logs = {"retain": l_retain.detach(), "c_rr": c_rr, "c_retain": c_retain,
                "retain_cos": masked_cosine(retain_now, retain_orig, retain["attention_mask"]).detach()}
        loss = c_retain * w_retain * l_retain
        shown = c_retain * l_retain.detach()
        if c_rr > 0:
            harmful_now = self.harmful_states(harmful)
            l_rr = rerouting_loss(harmful_now, harmful_orig, harmful["attention_mask"])
            loss = loss + c_rr * w_rr * l_rr
            shown = shown + c_rr * l_rr.detach()
            logs["rr"] = l_rr.detach()
            logs["cb_cos"] = masked_cosine(harmful_now, harmful_orig, harmful["attention_mask"]).detach()
        logs["loss"] = shown
        return loss, logs
