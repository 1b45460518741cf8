"""Optional LoRA adapters through peft."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from immunize.errors import UserError


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the named modules.

    Args:
        r: rank of the adapters.
        alpha: LoRA scaling numerator (the update is alpha / r * B A).
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt (e.g. q_proj, k_proj, v_proj).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])


def as_lora_spec(value) -> "LoraSpec | None":
    """A LoraSpec from a LoraSpec, its plain-dict form (as saved in a checkpoint's hyper-parameters) or None."""
    if value is None or isinstance(value, LoraSpec):
        return value
    if not isinstance(value, dict):
        raise UserError(f"model.lora must be a mapping such as {{r: 8, alpha: 16}}, got {type(value).__name__}")
    unknown = sorted(set(value) - {f.name for f in fields(LoraSpec)})
    if unknown:
        raise UserError(f"model.lora: unknown key {unknown[0]!r}; it takes {[f.name for f in fields(LoraSpec)]}")
    return LoraSpec(**value)


def apply_lora(model, spec: LoraSpec):
    """Wrap `model` with LoRA adapters; only the adapters stay trainable."""
    from peft import LoraConfig, get_peft_model

    if spec.r < 1:
        raise UserError(f"lora.r must be >= 1, got {spec.r}")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"LoRA: {str(err).splitlines()[0]}; check lora.target_modules") from err
