"""A finished stage leaves stage.json next to its exported model, so a rerun of the same stage skips it.

The key covers what the stage computes from: the resolved config (minus logging and output-location keys) and the
content of every input it names (immunize.fingerprint: the input model's files, data files, include paths, a
checkpoint). A changed data file or a re-exported input model changes the key, so the fit runs again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from immunize.fingerprint import computation_versions, input_digests
from immunize.io import atomic_write_json

STAGE_FILE = "stage.json"
FORMAT = 2  # 1: the config alone; 2: the config and its inputs' content
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
    """Stable short hash of a resolved config and the content of its inputs, ignoring logging and output-location
    keys."""
    cfg = json.loads(json.dumps(cfg, default=str))
    for key in IGNORED_KEYS:
        _drop(cfg, key)
    payload = {"format": FORMAT, "config": cfg, "inputs": input_digests(cfg)}
    versions = computation_versions(cfg)
    if versions:  # only where a computation changed since (immunize.fingerprint.COMPUTATION_VERSIONS)
        payload["computations"] = versions
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached(export_dir: Optional[str], digest: str) -> bool:
    """True when export_dir holds a finished export of a config with this hash."""
    if not export_dir:
        return False
    marker = Path(export_dir) / STAGE_FILE
    try:
        return json.loads(marker.read_text()).get("config_hash") == digest
    except (OSError, ValueError, AttributeError):
        return False


def mark_done(export_dir: str, digest: Optional[str], cfg: dict) -> None:
    """stage.json: the key (None when the fit was not keyed: it then never counts as cached) and the config."""
    atomic_write_json(Path(export_dir) / STAGE_FILE, {"config_hash": digest, "config": json.loads(json.dumps(cfg, default=str))})
