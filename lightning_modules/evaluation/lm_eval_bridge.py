"""Capability through lm-evaluation-harness (PyPI `lm-eval`, the `eval` extra), run in-process on a built model.

`run_lm_eval` wraps the transformers model and tokenizer this process already holds in lm-eval's HF model class (no
reload from disk or hub), loads the tasks with a TaskManager that sees this project's shipped tasks
(configs/eval/lm_eval: toy_mc, offline) plus any `include_path`, evaluates, and returns flat metrics in percent
({"lm_eval/<task>/acc": ..., "lm_eval/average": ...}) with lm-eval's per-sample records.

Task lookup is local first: only names outside the shipped folder and `include_path` pay for lm-eval's own index of
its thousands of task YAMLs (seconds). The calling process's state is left as it was: the model's train/eval mode
and device, the tokenizer (lm-eval gets a copy, which it may give a pad token), Python/NumPy/torch global random
states (lm-eval seeds them the way its own `simple_evaluate` does, for comparable numbers), and the HF offline
switches (on for the call when every task is a shipped one, so nothing reaches for the network).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from immunize.errors import UserError

# the shipped task folder, two levels above this file: a checkout's configs/ (lightning_modules/evaluation/ -> the
# repository root) and a wheel's immunize/configs/ (immunize/lightning_modules/evaluation/ -> immunize/)
_SHIPPED_CANDIDATES = (Path(__file__).resolve().parents[2] / "configs" / "eval" / "lm_eval",)
LM_EVAL_KEYS = ("tasks", "num_fewshot", "limit", "include_path", "batch_size")
INSTALL_HINT = "install the eval extra: pip install 'immunize[eval]'"
PERCENT_METRICS = frozenset({"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "f1"})
_SKIP_FIELDS = frozenset({"alias", "name", "sample_len", "sample_count", " ", ""})
LM_EVAL_SEEDS = {"random": 0, "numpy": 1234, "torch": 1234, "fewshot": 1234}  # lm-eval's simple_evaluate defaults


def shipped_task_dir() -> Path:
    """The folder of this project's lm-eval task YAMLs (toy_mc and its subtasks)."""
    for candidate in _SHIPPED_CANDIDATES:
        if candidate.is_dir():
            return candidate
    raise UserError(f"lm_eval: the shipped task folder is missing (looked in {', '.join(map(str, _SHIPPED_CANDIDATES))});"
                    " reinstall immunize")


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as err:
        raise UserError(f"lm_eval is not installed ({err}); {INSTALL_HINT}") from err
    return lm_eval


def _include_paths(include_path: Union[None, str, os.PathLike, Sequence]) -> list[str]:
    paths = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UserError(f"lm_eval.include_path {str(p)!r} does not exist; give a folder of lm-eval task YAMLs")
        out.append(str(path.resolve()))
    return out


def check_lm_eval_spec(spec: Optional[dict]) -> Optional[dict]:
    """Validate a CausalLMModule `lm_eval` section: known keys, a non-empty task list, sane numbers.

    Args:
        spec: {tasks: [...], num_fewshot: 0, limit: None, include_path: None, batch_size: 16} or None (no lm-eval).

    Returns:
        the spec with defaults filled in (tasks as a list of strings), or None.
    """
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise UserError(f"model.lm_eval must be a mapping with keys {list(LM_EVAL_KEYS)}, got {spec!r}")
    unknown = [k for k in spec if k not in LM_EVAL_KEYS]
    if unknown:
        raise UserError(f"model.lm_eval: unknown key {unknown[0]!r}; the keys are {list(LM_EVAL_KEYS)}")
    out = {"tasks": None, "num_fewshot": 0, "limit": None, "include_path": None, "batch_size": 16, **spec}
    tasks = out["tasks"]
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise UserError(f"model.lm_eval.tasks must be a non-empty list of task names (e.g. [toy_mc]), got {out['tasks']!r}")
    out["tasks"] = list(tasks)
    if out["num_fewshot"] is not None and (not isinstance(out["num_fewshot"], int) or out["num_fewshot"] < 0):
        raise UserError(f"model.lm_eval.num_fewshot must be an integer >= 0, got {out['num_fewshot']!r}")
    limit = out["limit"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise UserError(f"model.lm_eval.limit must be null, a count >= 1 or a fraction in (0, 1), got {limit!r}")
    bs = out["batch_size"]
    if not ((isinstance(bs, int) and not isinstance(bs, bool) and bs >= 1) or (isinstance(bs, str) and bs.startswith("auto"))):
        raise UserError(f"model.lm_eval.batch_size must be an integer >= 1 or 'auto', got {bs!r}")
    return out


@lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def resolve_tasks(tasks: Sequence[str], include_path=None) -> tuple[Any, bool]:
    """(a TaskManager that knows every name in `tasks`, whether all of them are shipped tasks), looking in the
    shipped folder and `include_path` first and in lm-eval's own tasks only for names not found there.

    Args:
        tasks: task, group or tag names (or paths to task YAML files).
        include_path: a folder (or list of folders) of further task YAMLs.
    """
    _import_lm_eval()
    shipped = str(shipped_task_dir())
    local = (shipped, *_include_paths(include_path))
    shipped_only = all(t in _task_manager((shipped,), False).all_tasks for t in tasks)
    manager = _task_manager(local, False)
    if any(t not in manager.all_tasks and not _is_yaml_file(t) for t in tasks):
        manager = _task_manager(local, True)
    missing = [t for t in tasks if t not in manager.all_tasks and not _is_yaml_file(t)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"lm_eval: unknown task {missing[0]!r}{more}; names are lm-eval's (list them with `lm-eval ls "
                        f"tasks`; hub tasks need their datasets cached or network) or this project's (toy_mc, "
                        "toy_mc_sentiment, toy_mc_topic, toy_mc_facts); for your own task YAMLs set lm_eval.include_path")
    return manager, shipped_only


@contextmanager
def _offline(enabled: bool):
    """HF hub/datasets offline for the block (environment and the libraries' already-read switches), then restored."""
    if not enabled:
        yield
        return
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    saved = [(mod, n, getattr(mod, n)) for mod, n in ((hconst, "HF_HUB_OFFLINE"), (dconfig, "HF_HUB_OFFLINE"),
                                                         (dconfig, "HF_DATASETS_OFFLINE")) if hasattr(mod, n)]
    os.environ.update({n: "1" for n in names})
    for mod, n, _ in saved:
        setattr(mod, n, True)
    try:
        yield
    finally:
        for mod, n, value in saved:
            setattr(mod, n, value)
        for n, value in saved_env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


@contextmanager
def _kept_random_state():
    """Seed Python/NumPy/torch as lm-eval's simple_evaluate does; put the caller's generator states back after."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    random.seed(LM_EVAL_SEEDS["random"])
    np.random.seed(LM_EVAL_SEEDS["numpy"])
    torch.manual_seed(LM_EVAL_SEEDS["torch"])
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


_NOISE = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model",
          "Custom kwargs can be passed to `--metadata`")


class _DropNoise(logging.Filter):
    """Drops lm-eval's warnings about what this bridge does on purpose (a built model, a custom_dataset loader)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


@contextmanager
def _quiet(names: Sequence[str] = ("lm_eval.models.huggingface", "lm_eval.api.task")):
    noise = _DropNoise()
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def _jsonable(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays, tensors
        return value.tolist()
    return str(value)


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def flatten_results(results: dict, requested: Sequence[str]) -> dict[str, float]:
    """lm-eval's results["results"] as {"lm_eval/<task>/<metric>": value}: fraction metrics (acc, acc_norm,
    exact_match, ... and their stderr) in percent, the filter name appended when it is not "none", the item count as
    "lm_eval/<task>/n", and "lm_eval/average": the mean acc over the requested names (groups by their aggregate;
    over all evaluated tasks when no requested name has one, e.g. a tag).

    Args:
        results: the dict lm-eval's evaluate returns.
        requested: the task names as asked for.
    """
    flat: dict[str, float] = {}
    for task, entry in results.get("results", {}).items():
        for field, raw in entry.items():
            if field in _SKIP_FIELDS or "," not in field:
                continue
            metric, _, filt = field.partition(",")
            value = _number(raw)
            if value is None:
                continue
            base = metric[: -len("_stderr")] if metric.endswith("_stderr") else metric
            if base in PERCENT_METRICS:
                value *= 100.0
            flat[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = value
        if _number(entry.get("sample_len")) is not None:
            flat[f"lm_eval/{task}/n"] = float(entry["sample_len"])
    accs = [flat[f"lm_eval/{t}/acc"] for t in requested if f"lm_eval/{t}/acc" in flat]
    if not accs:
        accs = [flat[f"lm_eval/{t}/acc"] for t in results.get("results", {}) if f"lm_eval/{t}/acc" in flat
                and t not in results.get("groups", {})]
    if accs:
        flat["lm_eval/average"] = sum(accs) / len(accs)
    return flat


def sample_records(results: dict) -> list[dict]:
    """lm-eval's per-sample logs as JSON-ready rows, each with its task name under "task"."""
    rows = []
    for task, samples in (results.get("samples") or {}).items():
        for sample in samples:
            rows.append(json.loads(json.dumps({"task": task, **sample}, default=_jsonable)))
    return rows


def run_lm_eval(model, tokenizer, tasks: Sequence[str], num_fewshot: Optional[int] = 0,
                limit: Optional[Union[int, float]] = None, include_path=None, batch_size: Union[int, str] = 16,
                device: Optional[str] = None, log_samples: bool = True) -> dict:
    """Evaluate a built causal LM on lm-eval tasks in this process.

    Args:
        model: a transformers causal LM (a peft model is evaluated through its base model, adapters active).
        tokenizer: its tokenizer (lm-eval gets a copy).
        tasks: lm-eval task, group or tag names (e.g. [toy_mc] or [mmlu, arc_easy, arc_challenge, hellaswag,
            truthfulqa_mc2]); the shipped ones need no network, hub ones need their datasets cached or network.
        num_fewshot: examples in each prompt (None: each task's own default); a task whose YAML fixes 0 keeps 0.
        limit: items per task (a count, or a fraction < 1); None: all (lm-eval's stderr assumes all).
        include_path: folder(s) of further task YAMLs.
        batch_size: requests per forward pass (an integer, or "auto").
        device: run on this device (the model is moved there for the call and back after); None: where it is.
        log_samples: keep lm-eval's per-sample records.

    Returns:
        {"metrics": flatten_results(...) (percent), "samples": sample_records(...) ([] without log_samples),
        "lm_eval_version": the harness's version}.
    """
    spec = check_lm_eval_spec({"tasks": list(tasks) if not isinstance(tasks, str) else tasks, "num_fewshot": num_fewshot,
                               "limit": limit, "include_path": include_path, "batch_size": batch_size})
    lm_eval = _import_lm_eval()
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    manager, offline = resolve_tasks(spec["tasks"], include_path)
    net = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = net.training
    home = next(net.parameters()).device
    target = torch.device(device) if device is not None else home
    try:
        with _offline(offline), _kept_random_state(), _quiet():
            try:
                loaded = manager.load(spec["tasks"])
            except Exception as err:  # a hub dataset not cached, a bad YAML, ...
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
                raise UserError(f"lm_eval: could not load tasks {spec['tasks']} ({type(err).__name__}: {first}); hub "
                                "tasks need their datasets in the HF cache (offline) or network access") from err
            for task in loaded["tasks"].values():  # as simple_evaluate: num_fewshot unless the YAML fixes 0
                if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=num_fewshot)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=LM_EVAL_SEEDS["fewshot"])
            if target != home:
                net.to(target)
            lm = HFLM(pretrained=net, tokenizer=copy.deepcopy(tokenizer), batch_size=spec["batch_size"])
            results = evaluate(lm=lm, task_dict=loaded, limit=spec["limit"], log_samples=log_samples)
    finally:
        if target != home:
            net.to(home)
        net.train(was_training)
    if results is None:  # lm-eval returns None off its rank 0; it is handed a single-process model here
        raise RuntimeError("lm-eval returned no results")
    return {"metrics": flatten_results(results, spec["tasks"]), "samples": sample_records(results) if log_samples else [],
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}
