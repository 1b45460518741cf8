"""LoRA adapters through peft, configured by peft's own LoraConfig fields and kept as plain data.

A `lora` setting is a mapping of LoraConfig's keyword arguments: r, lora_alpha, lora_dropout, target_modules (a list,
or "all-linear"), use_dora, use_rslora, modules_to_save, bias, layers_to_transform, ... (any of them). Keys left out
take immunize's defaults (DEFAULTS), then peft's. `alpha` and `dropout`, the short names of earlier immunize
configs, are read as lora_alpha and lora_dropout. task_type is always CAUSAL_LM. The normalized mapping is what a
module saves in its hyper-parameters, so a LoRA checkpoint holds plain data (torch's safe loader reads it).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from immunize.errors import UserError

DEFAULTS = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]}
ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
SET_HERE = ("task_type", "peft_type")


def lora_fields() -> list[str]:
    """The LoraConfig fields a `lora` mapping may set."""
    from peft import LoraConfig

    return sorted(f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name not in SET_HERE)


def lora_config(spec: Optional[Mapping[str, Any]]) -> Optional[dict]:
    """The LoRA settings as a plain, complete mapping (DEFAULTS, then `spec`, aliases resolved), checked by building
    peft's LoraConfig from it; None stays None. A one-line UserError for an unknown key or a value peft refuses."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise UserError(f"model.lora must be a mapping of peft LoraConfig fields such as {{r: 8, lora_alpha: 16}}, "
                        f"got {type(spec).__name__}")
    given = {ALIASES.get(k, k): v for k, v in spec.items()}
    if len(given) != len(spec):
        raise UserError(f"model.lora gives both a short name and its LoraConfig name ({sorted(spec)}); keep one")
    allowed = lora_fields()
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        fixed = " (task_type is always CAUSAL_LM)" if set(unknown) & set(SET_HERE) else ""
        raise UserError(f"model.lora: unknown key {unknown[0]!r}{fixed}; peft's LoraConfig takes {', '.join(allowed)}")
    out = {**DEFAULTS, **given}
    r = out["r"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"lora.r must be an integer >= 1, got {r!r}")
    _peft_config(out)
    return out


def _peft_config(settings: dict):
    from peft import LoraConfig

    try:
        return LoraConfig(task_type="CAUSAL_LM", **settings)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.lora: peft refuses these settings ({str(err).splitlines()[0]}); see peft's "
                        "LoraConfig") from err


def apply_lora(model, spec: Mapping[str, Any]):
    """Wrap `model` with LoRA adapters (lora_config(spec)); only the adapters (and modules_to_save) stay trainable."""
    from peft import get_peft_model

    config = _peft_config(lora_config(spec))
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"LoRA: {str(err).splitlines()[0]}; check lora.target_modules") from err


SAVED_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "use_rslora", "modules_to_save",
                "layers_to_transform")  # a continued adapter's settings, as its `lora` mapping
ADAPTER_DIR = "adapter"  # where an export with export_lora "adapter" keeps the LoRA adapter, beside the base weights


def saved_adapter(source: str) -> Optional[str]:
    """The adapter folder of a model directory exported with export_lora "adapter", or None."""
    import os

    path = os.path.join(source, ADAPTER_DIR)
    return path if os.path.isfile(os.path.join(path, "adapter_config.json")) else None


def attach_saved_adapter(model, adapter_dir: str, trainable: bool):
    """The base model with the saved adapter: merged into the weights (trainable=False: the model the exporting
    stage trained, as a merged export would be), or kept as a trainable adapter (True: training continues it, as
    Panacea's reference continues the alignment LoRA). Returns (model, the adapter's settings as a `lora` mapping)."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"cannot load the LoRA adapter in {adapter_dir!r}: {str(err).splitlines()[0]}; export the "
                        "model again") from err
    saved = peft_model.peft_config["default"]
    settings = {k: getattr(saved, k) for k in SAVED_FIELDS}
    if isinstance(settings["target_modules"], (set, list, tuple)):
        settings["target_modules"] = sorted(settings["target_modules"])
    if trainable:
        return peft_model, lora_config(settings)
    return peft_model.merge_and_unload(), None
