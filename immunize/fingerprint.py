"""Content fingerprints of the files a run reads, for cache keys that change when an input's bytes change.

`path_digest(path)`: the sha256 of a file's bytes, or for a folder a hash of its files' relative names and digests.
Hashing a 7B model's 13 GB on every rerun would cost a minute, so each file's digest is remembered together with
its size, modification time, change time and inode (a JSON memo in the user's cache folder): a file whose stat is
unchanged is not read again, and any write to it changes its change time, which the user cannot set back, so the
file is hashed again. `input_digests(config)` finds the inputs a stage config names: the existing files and
folders given under INPUT_KEYS (a model directory, a data file, an lm-eval include path, a checkpoint).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from immunize.io import atomic_write_json

INPUT_KEYS = ("model", "path", "paths", "data_files", "include_path", "tokenizer", "ckpt_path")
MEMO_LIMIT = 20000  # entries kept in the memo (the oldest are dropped first)
_memo: Optional[dict] = None
_memo_dirty = False


def memo_path() -> Path:
    """$IMMUNIZE_CACHE_DIR, else $XDG_CACHE_HOME/immunize, else ~/.cache/immunize; the memo file inside it."""
    root = os.environ.get("IMMUNIZE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "immunize")
    return Path(root) / "content_digests.json"


def _load_memo() -> dict:
    global _memo
    if _memo is None:
        try:
            data = json.loads(memo_path().read_text())
            _memo = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save_memo() -> None:
    global _memo_dirty
    if not _memo_dirty or _memo is None:
        return
    if len(_memo) > MEMO_LIMIT:
        for key in list(_memo)[: len(_memo) - MEMO_LIMIT]:
            del _memo[key]
    try:
        atomic_write_json(memo_path(), _memo)
    except OSError:
        pass  # an unwritable cache folder only costs rehashing next time
    _memo_dirty = False


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (remembered per stat, see the module docstring)."""
    global _memo_dirty
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    memo = _load_memo()
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    memo[key] = digest.hexdigest()
    _memo_dirty = True
    return memo[key]


def path_digest(path: str | os.PathLike) -> str:
    """A file's digest, or a folder's: every file below it by relative name and digest."""
    path = Path(path).expanduser()
    try:
        if path.is_file():
            return file_digest(path)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_digest(file)}\n".encode())
        return digest.hexdigest()
    finally:
        _save_memo()


def config_items(config: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) of every mapping in a nested config, depth first."""
    if isinstance(config, dict):
        for key, value in config.items():
            yield key, value
            yield from config_items(value)
    elif isinstance(config, list):
        for value in config:
            yield from config_items(value)


def input_paths(config: Any) -> list[str]:
    """The existing files and folders named under INPUT_KEYS anywhere in a config (as given, each once)."""
    found = [item for key, value in config_items(config) if key in INPUT_KEYS
             for item in (value if isinstance(value, list) else [value])
             if isinstance(item, str) and item.strip() and os.path.exists(os.path.expanduser(item))]
    return list(dict.fromkeys(found))


def input_digests(config: Any) -> dict[str, str]:
    """{absolute path: content digest} of every input a config names."""
    return {str(Path(p).expanduser().resolve()): path_digest(p) for p in input_paths(config)}


# Versions of computations a config does not spell out, bumped when one changes (docs/fidelity.md): a bench cell or a
# cached stage whose config uses one of them carries its version in its key, so a result made by the earlier
# computation is never reused for the new one, and every other key stays as it was. Classes by the last part of
# their class_path; "warmup" covers every config with warmup_ratio > 0 (the schedules became get_scheduler's).
COMPUTATION_VERSIONS = {"TAR": 2, "TVaccine": 2, "Antidote": 2, "Lisa": 2, "warmup": 2}


def computation_versions(config: Any) -> dict[str, int]:
    """{computation: version} of the COMPUTATION_VERSIONS entries the config uses (empty for most configs)."""
    found: dict[str, int] = {}
    for key, value in config_items(config):
        if key == "class_path" and isinstance(value, str) and value.rsplit(".", 1)[-1] in COMPUTATION_VERSIONS:
            name = value.rsplit(".", 1)[-1]
            found[name] = COMPUTATION_VERSIONS[name]
        elif key == "warmup_ratio" and isinstance(value, (int, float)) and value > 0:
            found["warmup"] = COMPUTATION_VERSIONS["warmup"]
    return found
