"""The one registry of defenses: name, stage, class, toy config, real-scale config, source paper.

The bench resolves `name: <defense>` here, benchmarks/step_cost.py measures every entry, the tests are
parametrized over it, and a test checks README's method table against it. Adding a defense is adding its source
file, its configs, its test and one entry below.

Alignment stage: the defense's config holds only its model section; the bench merges it over the toy defense
stage (configs/toy/defense.yaml: data and trainer), as `immunize fit --config configs/toy/defense.yaml --config
<defense config>` does. "undefended" is the aligned model itself (no stage).
Fine-tuning stage: the defense's config holds only trainer.callbacks; the bench appends them to the one fine-tune
(configs/finetune/toy.yaml). "sft" is that fine-tune with no callback. A callback argument `base_model: null` is filled
by the bench with the unaligned base model (SafeLoRA, which also needs a LoRA fine-tune: finetune.model's lora).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from immunize.bench.stages import find_file, read_yaml
from immunize.errors import UserError

ALIGNMENT, FINETUNE = "alignment", "finetune"
IDENTITY = "undefended"


@dataclass(frozen=True)
class Defense:
    """One registered defense.

    Args:
        name: what a bench config calls it.
        stage: "alignment" (a LightningModule run before release) or "finetune" (a callback on a user's fine-tune).
        class_path: its module or callback class (None: the reference without a defense).
        config: its toy config, defense part only (None: the reference).
        real_config: its full config with the published settings at real scale (None: none shipped).
        paper: where the method comes from.
    """

    name: str
    stage: str
    class_path: Optional[str]
    config: Optional[str]
    real_config: Optional[str] = None
    paper: str = ""


DEFENSES: tuple[Defense, ...] = (
    Defense(IDENTITY, ALIGNMENT, None, None, None, "plain safety SFT (the reference of every table)"),
    Defense("seam", ALIGNMENT, "immunize.lightning_modules.SEAM", "configs/defenses/seam.yaml", "configs/real/seam_llama2_7b.yaml",
            "SEAM, self-destructive models (arXiv 2505.12186)"),
    Defense("adversarial", ALIGNMENT, "immunize.lightning_modules.AdversarialImmunization", "configs/defenses/adversarial.yaml",
            "configs/real/adversarial_llama2_7b.yaml", "adversarial-loss immunization (Rosati et al. 2024)"),
    Defense("repnoise", ALIGNMENT, "immunize.lightning_modules.RepNoise", "configs/defenses/repnoise.yaml",
            "configs/real/repnoise_llama2_7b.yaml", "RepNoise, representation noising (Rosati et al. 2024)"),
    Defense("vaccine", ALIGNMENT, "immunize.lightning_modules.Vaccine", "configs/defenses/vaccine.yaml",
            "configs/real/vaccine_llama2_7b.yaml", "Vaccine, perturbation-aware alignment (Huang et al. 2024)"),
    Defense("booster", ALIGNMENT, "immunize.lightning_modules.Booster", "configs/defenses/booster.yaml",
            "configs/real/booster_llama2_7b.yaml", "Booster (Huang et al. 2025)"),
    Defense("tar", ALIGNMENT, "immunize.lightning_modules.TAR", "configs/defenses/tar.yaml", "configs/real/tar_llama3_8b.yaml",
            "TAR, tamper-resistant safeguards (Tamirisa et al. 2024)"),
    Defense("t_vaccine", ALIGNMENT, "immunize.lightning_modules.TVaccine", "configs/defenses/t_vaccine.yaml",
            "configs/real/t_vaccine_llama2_7b.yaml", "T-Vaccine, targeted Vaccine (Liu et al. 2024)"),
    Defense("circuit_breakers", ALIGNMENT, "immunize.lightning_modules.CircuitBreakers", "configs/defenses/circuit_breakers.yaml",
            "configs/real/circuit_breakers_llama3_8b.yaml", "Circuit Breakers, representation rerouting (Zou et al. 2024)"),
    Defense("sft", FINETUNE, None, None, None, "the user's fine-tune without a defense (the reference)"),
    Defense("panacea", FINETUNE, "immunize.callbacks.Panacea", "configs/finetune/panacea.yaml", "configs/real/panacea_llama2_7b.yaml",
            "Panacea, post-fine-tuning perturbation (Wang et al. 2025)"),
    Defense("random", FINETUNE, "immunize.callbacks.RandomPerturbation", "configs/finetune/random_perturbation.yaml", None,
            "random perturbation (Panacea's baseline)"),
    Defense("lisa", FINETUNE, "immunize.callbacks.Lisa", "configs/finetune/lisa.yaml", "configs/real/lisa_llama2_7b.yaml",
            "Lisa, lazy safety alignment (Huang et al. 2024)"),
    Defense("antidote", FINETUNE, "immunize.callbacks.Antidote", "configs/finetune/antidote.yaml",
            "configs/real/antidote_llama2_7b.yaml", "Antidote, post-fine-tuning pruning (Huang et al. 2024)"),
    Defense("safe_lora", FINETUNE, "immunize.callbacks.SafeLoRA", "configs/finetune/safe_lora.yaml",
            "configs/real/safe_lora_llama2_7b.yaml", "SafeLoRA, projection of LoRA updates (Hsu et al. 2024)"),
)
BY_NAME = {d.name: d for d in DEFENSES}


def of_stage(stage: str) -> list[Defense]:
    return [d for d in DEFENSES if d.stage == stage]


def alignment_defenses() -> dict[str, Optional[str]]:
    """name -> defense config (None: the identity, i.e. the aligned model)."""
    return {d.name: d.config for d in of_stage(ALIGNMENT)}


def finetune_defenses() -> dict[str, Optional[str]]:
    """name -> the config whose trainer.callbacks the defense adds (None: no callback)."""
    return {d.name: d.config for d in of_stage(FINETUNE)}


def resolve_alignment_defense(spec) -> Optional[str]:
    """The config file of an alignment-stage defense: its own, else the registry's (None: the identity, or a
    defense given inline by its model section). Unknown names without a config or model are errors."""
    if spec.config:
        return spec.config
    known = alignment_defenses()
    name = getattr(spec, "family", None) or spec.name
    if name in known:
        return known[name]
    if isinstance(spec.model, dict) and "class_path" in spec.model:
        return None
    raise UserError(f"unknown defense {spec.name!r}: not in the registry {sorted(known)}; give it a config "
                    f"(defenses: [{{name: {spec.name}, config: path/to/fit.yaml}}]) or a model class_path")


def resolve_finetune_defense(spec) -> tuple[Optional[str], list[dict]]:
    """(config file merged over the fine-tune or None, callbacks) of a fine-tuning-stage defense.

    callbacks: the defense's own, else those of the registry's config for its name; config: the defense's own."""
    known = finetune_defenses()
    name = getattr(spec, "family", None) or spec.name
    if spec.callbacks is not None:
        callbacks = list(spec.callbacks)
    elif name in known:
        callbacks = registry_callbacks(name)
    elif any(getattr(spec, key, None) for key in ("config", "model", "data", "trainer")):
        callbacks = []
    else:
        raise UserError(f"unknown fine-tuning-stage defense {spec.name!r}: not in the registry {sorted(known)}; "
                        f"give it callbacks ({{name: {spec.name}, callbacks: [{{class_path: ...}}]}}) or a config")
    return spec.config, callbacks


def registry_callbacks(name: str) -> list[dict]:
    """The trainer.callbacks of a registered fine-tuning-stage defense's config ([] for "sft")."""
    path = BY_NAME[name].config
    if path is None:
        return []
    what = f"fine-tuning-stage defense {name!r}"
    found = (read_yaml(find_file(path, what), what).get("trainer") or {}).get("callbacks") or []
    return [dict(cb) for cb in (found if isinstance(found, list) else [found])]
