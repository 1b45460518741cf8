"""Load a causal LM and its tokenizer from a toy preset, a local directory, a GGUF file or a hub id."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from immunize.errors import UserError
from immunize.lightning_modules.modeling.toy_presets import toy_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_PREFIX = "toy:"


# What transformers raises for a missing, damaged or unsupported model or tokenizer (never for a bug of ours alone).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def load_error(what: str, source: str, gguf_file: Optional[str], err: BaseException, check: str) -> UserError:
    """The one-line error of a failed load: a damaged GGUF file, or a hub id / local directory to check."""
    if gguf_file:
        return UserError(f"cannot read {what} in {os.path.join(source, gguf_file)!r}: {_first_line(err)}; the GGUF file "
                         "may be truncated or damaged: download it again")
    return UserError(f"cannot load {what} of {source!r}: {_first_line(err)}; check the hub id or {check}")


def _looks_local(source: str) -> bool:
    return os.path.isabs(source) or source.startswith(".") or os.path.exists(source) or source.count("/") != 1


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_PATTERNS = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def check_source(source: str, gguf_file: Optional[str] = None) -> None:
    """Fail early, in one line, when a local model directory, its GGUF file, its tokenizer or its weights are not
    there."""
    if source.startswith(TOY_PREFIX) or not _looks_local(source):
        return
    if not os.path.isdir(source):
        raise UserError(f"model path {source!r} does not exist; export a model there first or give a hub id or toy:<preset>")
    if gguf_file:
        if not os.path.isfile(os.path.join(source, gguf_file)):
            raise UserError(f"gguf_file {gguf_file!r} not found in {source!r}; list the directory for the .gguf name")
        return  # a GGUF file carries its tokenizer and weights
    files = os.listdir(source)
    if not any(name in files for name in TOKENIZER_FILES):
        raise UserError(f"model directory {source!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}); save it "
                        "there with tokenizer.save_pretrained(dir), or export the model with `immunize fit --export_dir`")
    if "config.json" not in files:
        raise UserError(f"model directory {source!r} has no config.json; it is not a Hugging Face model directory "
                        "(save it with model.save_pretrained(dir))")
    try:
        config = json.loads(Path(source, "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise UserError(f"model directory {source!r}: config.json is not readable JSON ({str(err).splitlines()[0]}); "
                        "export the model again (model.save_pretrained(dir))") from err
    if not isinstance(config, dict):
        raise UserError(f"model directory {source!r}: config.json holds a {type(config).__name__}, not a mapping; "
                        "export the model again (model.save_pretrained(dir))")
    if not any(name.endswith(WEIGHT_PATTERNS) for name in files):
        raise UserError(f"model directory {source!r} has no weights (*.safetensors or *.bin); save them with "
                        "model.save_pretrained(dir)")


def plain_weights(model):
    """A model loaded from GGUF is dequantised (plain fp32/bf16 tensors) but marked quantized by transformers, which
    then refuses to save it; drop those marks, so every later stage (training, export) sees a plain model."""
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        method = getattr(model.config.quantization_config, "quant_method", None)
        if str(getattr(method, "value", method)) == "gguf":
            del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
    return model


def load_tokenizer(source: str, gguf_file: Optional[str] = None, trust_remote_code: bool = False):
    """Tokenizer for a model source; the toy tokenizer for toy presets. Adds a pad token when missing."""
    check_source(source, gguf_file)
    if source.startswith(TOY_PREFIX):
        from immunize.datamodules.toy.tokenizer import build_toy_tokenizer

        return build_toy_tokenizer()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except LOAD_ERRORS as err:
        raise load_error("the tokenizer", source, gguf_file, err, "the local directory's tokenizer files") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: str, tokenizer, gguf_file: Optional[str] = None, dtype: str = "float32",
               trust_remote_code: bool = False, init_seed: int = 0):
    """The model named by `source`; toy presets get a fresh, seeded random init."""
    torch_dtype = parse_dtype(dtype)
    if source.startswith(TOY_PREFIX):
        config = toy_config(source[len(TOY_PREFIX):], tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            return LlamaForCausalLM(config).to(torch_dtype)
    check_source(source, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return plain_weights(AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                                  trust_remote_code=trust_remote_code, **kwargs))
    except LOAD_ERRORS as err:
        raise load_error("the model", source, gguf_file, err, "the local directory's config.json and weights") from err


def resolve_source(source: str) -> str:
    """Model sources that are local directories are made absolute, so DDP workers find them too."""
    if not source.startswith(TOY_PREFIX) and os.path.isdir(source):
        return os.path.abspath(source)
    return source
