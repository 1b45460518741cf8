"""Output folders immunize owns: which folders it may replace, and how it replaces one so that a crash at any
moment leaves one whole copy.

A folder immunize writes (an exported model, an imported GGUF, a bench cell's model) holds an ownership marker
(OWNER_MARKERS) from the moment it is staged. `check_output_dir` refuses, before any work, a target that it must not
replace: a file, a non-empty folder without a marker, the filesystem root, the home folder, the current folder or
one above it. `replace_dir` swaps a finished staging folder with the target in one atomic step (Linux
renameat2 RENAME_EXCHANGE), so `kill -9` at any moment leaves either the old or the new folder at the target,
whole; where that call does not exist it moves the old folder aside first and `recover` puts it back if a crash
came between the two renames. Staging and set-aside folders are siblings named `.<name>.immunize-*`; leftovers of a
killed run are removed by the next `prepare_staging` for the same target, and only when they hold a marker.
"""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from immunize.errors import UserError
from immunize.io import atomic_write_json

EXPORT_MARKER = "immunize_export.json"
# Markers written by immunize: an export (this file), a finished fit's cache (stage.json, immunize.stage_cache),
# a GGUF import (immunize_import.json, immunize.gguf_import). Any of them makes a folder immunize's to replace.
OWNER_MARKERS = (EXPORT_MARKER, "stage.json", "immunize_import.json")
STAGING, ASIDE = "immunize-staging", "immunize-old"


def is_owned(path: Path) -> bool:
    """Whether the folder holds one of immunize's ownership markers."""
    return any((Path(path) / marker).is_file() for marker in OWNER_MARKERS)


def _protected(target: Path) -> Optional[str]:
    """Why replacing `target` would be unsafe whatever it holds, or None."""
    if target == Path(target.anchor):
        return "it is the filesystem root"
    if target.name in ("", ".", ".."):
        return "it names no folder of its own"
    home = Path.home().resolve()
    if target == home:
        return "it is your home folder"
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        return "it is the current folder or one above it"
    return None


def check_output_dir(path: str | os.PathLike, what: str) -> None:
    """Before any work: `path` may be written (created, or replaced whole) by immunize, or a one-line UserError
    naming `what` (e.g. "--export_dir") and the fix. Allowed: a path that does not exist, an empty folder, or a
    folder that holds immunize's marker (an earlier export or import)."""
    raw = str(path)
    if not raw.strip():
        raise UserError(f"{what} is empty; give a new or empty folder")
    target = Path(raw).expanduser().resolve()
    recover(target)
    why = _protected(target)
    if why is not None:
        raise UserError(f"{what} {raw!r} cannot be used: {why}, and the output folder is replaced whole; give a new "
                        "folder (e.g. runs/<name>)")
    if target.exists() and not target.is_dir():
        raise UserError(f"{what} {raw!r} is a file, not a folder; give a new or empty folder")
    if target.is_dir() and any(target.iterdir()) and not is_owned(target):
        raise UserError(f"{what} {raw!r} holds files immunize did not write (no {EXPORT_MARKER}), and the output "
                        "folder is replaced whole; give a new or empty folder, or move those files away")
    probe = target.parent  # the staging folder is made beside the target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {raw!r} cannot be written ({probe} is not a writable folder); choose another folder")


def _siblings(target: Path, kind: str) -> Iterable[Path]:
    return target.parent.glob(f".{target.name}.{kind}-*") if target.parent.is_dir() else []


def recover(target: Path) -> None:
    """After a crash between the two renames of the fallback replacement: the target is missing and the old
    folder is set aside; put it back."""
    target = Path(target)
    if target.exists():
        return
    for aside in sorted(_siblings(target, ASIDE), key=lambda p: p.stat().st_mtime, reverse=True):
        if aside.is_dir() and is_owned(aside):
            os.replace(aside, target)
            return


def remove_owned(folder: Path) -> None:
    """Delete a folder of immunize's with its ownership markers last, so a delete cut short by a kill leaves a folder
    that still says it is immunize's (and the next prepare_staging finishes the job)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    entries = sorted(folder.rglob("*"), key=lambda p: (p.name in OWNER_MARKERS, -len(p.parts)))
    for entry in entries:
        try:
            entry.rmdir() if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


def _only_marker_in_progress(folder: Path) -> bool:
    """A staging folder killed before its marker was in place: empty, or holding only the marker's temporary file."""
    return all(p.name.startswith(f".{EXPORT_MARKER}.") and p.name.endswith(".tmp") for p in folder.iterdir())


def prepare_staging(target: str | os.PathLike) -> Path:
    """A fresh staging folder beside `target`, marked as immunize's from the start; leftovers of earlier killed
    runs for the same target (staging or set-aside folders that hold a marker) are removed first."""
    target = Path(target).expanduser().absolute()
    recover(target)
    for leftover in [*_siblings(target, STAGING), *_siblings(target, ASIDE)]:
        if leftover.is_dir() and (is_owned(leftover) or _only_marker_in_progress(leftover)):
            remove_owned(leftover)
    staging = target.parent / f".{target.name}.{STAGING}-{os.getpid()}"
    staging.mkdir(parents=True)
    atomic_write_json(staging / EXPORT_MARKER, {"target": target.name})
    return staging


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the call is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem or kernel cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished staging folder at `target`, replacing an earlier folder there (one immunize owns, as
    check_output_dir made sure) without a moment where neither is whole."""
    staging, target = Path(staging), Path(target).expanduser().absolute()
    if target.exists() and not is_owned(target) and any(target.iterdir()):
        raise UserError(f"{target} holds files immunize did not write; it is not replaced (the new output stays in "
                        f"{staging})")
    if not target.exists():
        os.replace(staging, target)
        return target
    if _exchange(staging, target):
        remove_owned(staging)  # now the old folder
        return target
    aside = target.parent / f".{target.name}.{ASIDE}-{os.getpid()}"
    os.replace(target, aside)
    os.replace(staging, target)
    remove_owned(aside)
    return target

