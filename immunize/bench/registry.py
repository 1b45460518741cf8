"""Named defenses: what `name: seam` or `name: panacea` means when a defense gives no config of its own.

Alignment stage: "undefended" (the aligned model itself, no stage) and every configs/defenses/<name>.yaml.
Fine-tuning stage: "sft" (the plain fine-tune), "panacea", "random" (random perturbation), and every
configs/finetune/<name>.yaml, of which only trainer.callbacks is used: every fine-tuning-stage defense runs
the same fine-tune (same data, ratio, lr), so their rows compare. A defense that gives `config` itself
gets that whole file merged over the fine-tune instead.
"""
from __future__ import annotations

from typing import Optional

from immunize.bench.stages import REPO_ROOT
from immunize.errors import UserError

IDENTITY = "undefended"
FINETUNE_CALLBACKS = {
    "sft": [],
    "panacea": [{"class_path": "callbacks.Panacea"}],
    "random": [{"class_path": "callbacks.RandomPerturbation"}],
    "random_perturbation": [{"class_path": "callbacks.RandomPerturbation"}],
}


def _config_dir_names(sub: str) -> dict[str, str]:
    folder = REPO_ROOT / "configs" / sub
    return {p.stem: str(p.relative_to(REPO_ROOT)) for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def alignment_defenses() -> dict[str, Optional[str]]:
    """name -> config path (None: the identity, i.e. the aligned model)."""
    return {IDENTITY: None, **_config_dir_names("defenses")}


def finetune_defenses() -> dict[str, Optional[str]]:
    """name -> config path whose trainer.callbacks the defense adds (None: the builtin callbacks)."""
    return {**{name: None for name in FINETUNE_CALLBACKS}, **_config_dir_names("finetune")}


def resolve_alignment_defense(spec) -> Optional[str]:
    """The config file of an alignment-stage defense: its own, else the registry's (None: the identity, or a
    defense given inline by its model section). Unknown names without a config or model are errors."""
    if spec.config:
        return spec.config
    known = alignment_defenses()
    if spec.name in known:
        return known[spec.name]
    if isinstance(spec.model, dict) and "class_path" in spec.model:
        return None
    raise UserError(f"unknown defense {spec.name!r}: not in the registry {sorted(known)}; give it a config "
                    f"(defenses: [{{name: {spec.name}, config: path/to/fit.yaml}}]) or a model class_path")


def resolve_finetune_defense(spec) -> tuple[Optional[str], list[dict]]:
    """(config file merged over the fine-tune or None, callbacks) of a fine-tuning-stage defense.

    callbacks: the defense's own, else the registry's for its name; config: the defense's own only."""
    known = finetune_defenses()
    if spec.callbacks is not None:
        callbacks = list(spec.callbacks)
    elif spec.name in FINETUNE_CALLBACKS and known[spec.name] is None:
        callbacks = [dict(cb) for cb in FINETUNE_CALLBACKS[spec.name]]
    elif spec.name in known:
        from immunize.bench.stages import find_file, read_yaml

        what = f"fine-tuning-stage defense {spec.name!r}"
        found = (read_yaml(find_file(known[spec.name], what), what).get("trainer") or {}).get("callbacks") or []
        callbacks = [dict(cb) for cb in (found if isinstance(found, list) else [found])]
    elif any(getattr(spec, key, None) for key in ("config", "model", "data", "trainer")):
        callbacks = []
    else:
        raise UserError(f"unknown fine-tuning-stage defense {spec.name!r}: not in the registry {sorted(known)}; "
                        f"give it callbacks ({{name: {spec.name}, callbacks: [{{class_path: ...}}]}}) or a config")
    return spec.config, callbacks
