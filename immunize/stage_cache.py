"""A finished stage leaves stage.json (its config hash) next to its exported model, so reruns skip it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from immunize.io import atomic_write_json

STAGE_FILE = "stage.json"
# Keys that do not change what a stage computes.
IGNORED_KEYS = ("config", "export_dir", "skip_if_cached", "trainer.logger", "trainer.enable_progress_bar", "trainer.default_root_dir")


def _drop(cfg: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(cfg.get(head), dict):
            _drop(cfg[head], rest)
    else:
        cfg.pop(head, None)


def config_hash(cfg: dict[str, Any]) -> str:
    """Stable short hash of a resolved config, ignoring logging and output-location keys."""
    cfg = json.loads(json.dumps(cfg, default=str))
    for key in IGNORED_KEYS:
        _drop(cfg, key)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def cached(export_dir: Optional[str], digest: str) -> bool:
    """True when export_dir holds a finished export of a config with this hash."""
    if not export_dir:
        return False
    marker = Path(export_dir) / STAGE_FILE
    try:
        return json.loads(marker.read_text()).get("config_hash") == digest
    except (OSError, ValueError):
        return False


def mark_done(export_dir: str, digest: str, cfg: dict) -> None:
    atomic_write_json(Path(export_dir) / STAGE_FILE, {"config_hash": digest, "config": json.loads(json.dumps(cfg, default=str))})
