"""Stage configs: read a fit/test YAML, merge inline overrides, and edit dotted keys.

Everything here works on plain dicts (what `immunize fit --config` reads), so cells can be hashed and
written back as YAML.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from immunize.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("model", "data", "trainer")
# Top-level keys of a LightningCLI fit/test config; the bench sets or drops the ones after `seed_everything`.
KNOWN_TOP_KEYS = {"model", "data", "trainer", "optimizer", "lr_scheduler", "seed_everything", "export_dir",
                  "skip_if_cached", "ckpt_path"}
DROPPED_TOP_KEYS = ("export_dir", "skip_if_cached", "ckpt_path")


PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # configs/ as installed in a wheel


def find_file(path: str, what: str) -> Path:
    """An existing file: absolute, else relative to the current directory, else to the immunize checkout, else (for
    configs/...) among the configs installed with the package (a wheel install has no checkout)."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]
    if not p.is_absolute() and p.parts[:1] == ("configs",):
        candidates.append(PACKAGED_CONFIGS.joinpath(*p.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise UserError(f"{what}: config file {path!r} not found (looked in {Path.cwd()}, {REPO_ROOT} and the installed "
                    "configs)")


def read_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{what}: {path} is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise UserError(f"{what}: {path} must hold a mapping (model/data/trainer sections)")
    unknown = sorted(set(data) - KNOWN_TOP_KEYS)
    if unknown:
        raise UserError(f"{what}: {path} has unknown top-level key {unknown[0]!r}; expected {sorted(KNOWN_TOP_KEYS)}")
    return data


def deep_merge(base: Any, override: Any) -> Any:
    """override merged into base: dicts key by key (recursively), anything else replaced. Inputs are not changed."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            out[key] = deep_merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    return copy.deepcopy(override)


def merge_section(base: Optional[dict], override: Optional[dict]) -> Optional[dict]:
    """A model/data section merged with an override; another class_path replaces the whole section."""
    if override is None:
        return copy.deepcopy(base)
    if base is None or ("class_path" in override and override["class_path"] != base.get("class_path")):
        return copy.deepcopy(override)
    return deep_merge(base, override)


def load_stage(spec, what: str, base: Optional[dict] = None) -> dict:
    """A stage's config dict: `base` (if given), then spec.config's file, then spec's inline sections."""
    cfg = copy.deepcopy(base) if base is not None else {}
    if getattr(spec, "config", None):
        from_file = read_yaml(find_file(spec.config, what), what)
        for key, value in from_file.items():
            cfg[key] = merge_section(cfg.get(key), value) if key in SECTIONS else value
    for key in SECTIONS:
        override = getattr(spec, key, None)
        if override is not None:
            if not isinstance(override, dict):
                raise UserError(f"{what}: {key} must be a mapping, got {type(override).__name__}")
            cfg[key] = merge_section(cfg.get(key), override)
    for key in DROPPED_TOP_KEYS:
        cfg.pop(key, None)
    if not isinstance(cfg.get("model"), dict) or "class_path" not in cfg["model"]:
        raise UserError(f"{what}: no model class_path; give a config file or model: {{class_path: ..., init_args: ...}}")
    return cfg


def _split(dotted: str) -> list:
    return [int(p) if p.isdigit() else p for p in dotted.split(".")]


def get_dotted(cfg: Any, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in _split(dotted):
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return default
    return node


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    """Set a dotted key ("model.init_args.lr", "data.init_args.train.0.limit"), creating dicts on the way."""
    parts = _split(dotted)
    node = cfg
    for part, nxt in zip(parts[:-1], parts[1:]):
        if isinstance(part, int):
            node = node[part]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    node[parts[-1]] = value


def init_args(cfg: dict, section: str) -> dict:
    """cfg[section]["init_args"], created when missing."""
    return cfg.setdefault(section, {}).setdefault("init_args", {})


def walk_dicts(obj: Any, fn: Callable[[dict], None]) -> None:
    """Call fn on every dict nested in obj (depth first)."""
    if isinstance(obj, dict):
        fn(obj)
        for value in obj.values():
            walk_dicts(value, fn)
    elif isinstance(obj, list):
        for value in obj:
            walk_dicts(value, fn)


def apply_heldout(cfg: dict, heldout: list[str]) -> None:
    """Give every source that selects categories by group ("seen"/"heldout") the bench's held-out list: toy sources
    and the real kinds with categories (beavertails, generic)."""
    def visit(d: dict) -> None:
        if d.get("kind", "toy") in ("toy", "beavertails", "generic") and d.get("categories") in ("seen", "heldout") \
                and ("part" in d or "split" in d or "path" in d):
            d["heldout_categories"] = list(heldout)

    walk_dicts(cfg.get("data"), visit)
    walk_dicts((cfg.get("trainer") or {}).get("callbacks"), visit)


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
