"""`immunize judges SOURCE... --judge SPEC --judge SPEC ...`: score the same generations with several judges and
report how far they agree (users ask which judge to trust).

SOURCE is a `generations.jsonl` written by `immunize test`, or a folder searched for them (a bench output folder
holds one per evaluated model). Its harmful rows (prompt, answer, category) are the items; `--limit N` keeps a
seeded random N of them. SPEC is a judge of immunize.judges: a name (`keyword`, `oracle`), a YAML mapping
(`'{name: llm, model: runs/smollm2, label: smollm2-yes-no}'`; `label` names the judge in the tables), or
`recorded`: the score the evaluation's own judge wrote into the generations.

Outputs in --out (default runs/judges): `scores/<label>-<hash>.jsonl` (each judge's score and raw output per
distinct (prompt, answer), written after every chunk of items: a killed run resumes where it stopped; a judge whose
spec, local model files or scoring code changed starts over), `judge_scores.jsonl` (one row per item with every judge's score), `agreement.json`
(immunize.judges.agreement: share flagged per judge, unparseable answers, pairwise agreement and Cohen's kappa) and
`agreement.md`, which is also printed.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from immunize.errors import OneLineArgumentParser, UserError, errors_only_on_stderr, fail
from immunize.fingerprint import path_digest
from immunize.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from immunize.judges.agreement import agreement
from immunize.judges import make_judge

RECORDED = "recorded"
OUTPUT_NAMES = ("scores", "judge_scores.jsonl", "agreement.json", "agreement.md")  # what --out may already hold
CHUNK = 64
JUDGES_CODE_VERSION = 3  # raise when a judge's prompt, parser or scoring changes: cached scores are then redone


def find_generations(sources: list[str]) -> list[Path]:
    """Every generations.jsonl named or found under the given folders (sorted), or a UserError naming the path."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(path.rglob("generations.jsonl"))
            if not inside:
                raise UserError(f"no generations.jsonl under {source!r}; pass the folder `immunize test` or "
                                "`immunize bench` wrote, or the file itself")
            found.extend(inside)
        else:
            raise UserError(f"generations source {source!r} does not exist; pass a generations.jsonl or a folder")
    unique = {p.resolve(): p for p in found}  # a folder and a file inside it, or overlapping folders: each file once
    return list(unique.values())


def _rows(path: Path):
    """(line number, dict) for every non-blank line of a generations file, or a one-line UserError naming the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); pass the generations.jsonl `immunize test` "
                        "wrote") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n} is not a JSON line ({e.msg}); pass files that `immunize test` wrote") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n} is a JSON {type(row).__name__}, not an object; generations rows are objects "
                            "with prompt, answer and kind")
        yield n, row


def _recorded_score(item: dict) -> float:
    """An item's recorded judge score as a float (NaN for null: unparseable), or a one-line UserError."""
    value = item["recorded"]
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise UserError(f"{item['line']}: judge_score {value!r} is not a number in [0, 1] (or null); fix the row or "
                        "leave out --judge recorded")
    return float(value)


def read_items(paths: list[Path], limit: Optional[int] = None, seed: int = 0) -> list[dict]:
    """The harmful rows of the generations files: {source, prompt, answer, category, group, recorded}."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    items = []
    for path in paths:
        for n, row in _rows(path):
            if row.get("kind") != "harmful":
                continue
            missing = [k for k in ("prompt", "answer") if k not in row]
            if missing:
                raise UserError(f"{path}:{n} has no field {missing[0]!r}; generations rows need prompt and answer")
            bad = [k for k in ("prompt", "answer") if row[k] is not None and not isinstance(row[k], str)]
            if bad:
                raise UserError(f"{path}:{n}: field {bad[0]!r} is a {type(row[bad[0]]).__name__}, not text")
            items.append({"source": str(path), "prompt": row["prompt"] or "", "answer": row["answer"] or "",
                          "category": row.get("category"), "group": row.get("group"),
                          "recorded": row.get("judge_score", RECORDED), "line": f"{path}:{n}"})
    if not items:
        raise UserError(f"no harmful rows in {len(paths)} generations file(s); nothing for the judges to score")
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def parse_spec(text: str) -> tuple[str, Any]:
    """(label, make_judge spec) from a --judge value: a name or a YAML mapping with an optional 'label'."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return stripped, stripped
    try:
        spec = json.loads(stripped)  # JSON first: YAML would read 1e-05 as text
    except json.JSONDecodeError:
        spec = None
    try:
        spec = yaml.safe_load(stripped) if spec is None else spec
    except yaml.YAMLError as e:
        raise UserError(f"--judge {text!r} is not a YAML mapping ({str(e).splitlines()[0]}); "
                        "write it as '{name: llm, model: DIR}'") from e
    if not isinstance(spec, dict) or "name" not in spec:
        raise UserError(f"--judge {text!r} needs a 'name' key, e.g. '{{name: llm, model: DIR}}'")
    label = str(spec.pop("label", spec["name"]))
    return label, spec


def item_key(prompt: str, answer: str) -> str:
    return hashlib.sha1(f"{prompt}\0{answer}".encode()).hexdigest()


def _model_fingerprint(model: Any) -> Any:
    """The content digest of a local judge model (a retrained model invalidates the cache; immunize.fingerprint);
    a hub id or anything else as it is."""
    if not isinstance(model, str):
        return model
    path = Path(model).expanduser()
    return [model, path_digest(path)] if path.exists() else model


def spec_hash(spec: Any) -> str:
    """The cache key of a judge: its spec, its local model files and the judges' code version."""
    key = {"spec": spec, "code": JUDGES_CODE_VERSION}
    if isinstance(spec, dict) and "model" in spec:
        key["model_files"] = _model_fingerprint(spec["model"])
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(out: Path, label: str) -> Path:
    """out/scores/<label, made safe as a file name>-<hash of the label>.jsonl."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "judge"
    return out / "scores" / f"{safe[:60]}-{hashlib.sha1(label.encode()).hexdigest()[:8]}.jsonl"


def _load_cache(path: Path, digest: str) -> dict[str, dict]:
    if not path.is_file():
        return {}
    damaged = f"score cache {path} is damaged"
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{damaged} ({getattr(e, 'msg', None) or e.reason}); delete it and rerun (its judge starts "
                        "over)") from e
    if not rows or not isinstance(rows[0], dict) or rows[0].get("spec_hash") != digest:
        return {}  # another spec, model or code version under this label: start over
    for n, r in enumerate(rows[1:], 2):
        score = r.get("score") if isinstance(r, dict) else None
        if not isinstance(r, dict) or not isinstance(r.get("key"), str) or not (
                score is None or (isinstance(score, (int, float)) and not isinstance(score, bool))):
            raise UserError(f"{damaged} (line {n} has no key or no numeric score); delete it and rerun (its judge "
                            "starts over)")
    return {r["key"]: r for r in rows[1:]}


def score_with(label: str, spec: Any, items: list[dict], out: Path, progress: bool = True) -> list[float]:
    """One judge's scores for the items (NaN: unparseable), resuming from and extending its cache (cache_path)."""
    if spec == RECORDED:
        if any(it["recorded"] == RECORDED for it in items):
            raise UserError("--judge recorded: some generations rows have no judge_score (benign rows or files not "
                            "written by `immunize test`)")
        return [_recorded_score(it) for it in items]
    digest = spec_hash(spec)
    path = cache_path(out, label)
    cache = _load_cache(path, digest)
    todo: dict[str, dict] = {}
    for it in items:
        key = item_key(it["prompt"], it["answer"])
        if key not in cache:
            todo.setdefault(key, it)
    if todo:
        judge = make_judge(spec)
        if hasattr(judge, "load") and getattr(judge, "device", None) is not None:  # a judge model: say where it runs
            judge.load()
            if progress:
                print(f"immunize judges: {label}: {type(judge).__name__} on {judge.device} ({judge.dtype})",
                      file=sys.stderr)
        keys = list(todo)
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start:start + CHUNK]
            values = judge.score([todo[k]["prompt"] for k in chunk], [todo[k]["answer"] for k in chunk])
            outputs = getattr(judge, "last_outputs", None) or [{} for _ in chunk]
            for k, v, o in zip(chunk, values, outputs):
                cache[k] = {"key": k, "score": None if math.isnan(v) else float(v), "output": o.get("output")}
            atomic_write_jsonl(path, [{"spec_hash": digest, "label": label, "spec": spec}, *cache.values()])
            if progress:
                print(f"immunize judges: {label}: {min(start + CHUNK, len(keys))}/{len(keys)} scored",
                      file=sys.stderr)
        del judge
    values = [cache[item_key(it["prompt"], it["answer"])]["score"] for it in items]
    return [math.nan if v is None else float(v) for v in values]


def _fmt(interval: Optional[list[float]]) -> str:
    if interval is None:
        return "-"
    value, low, high = interval
    return f"{value:.1f} [{low:.1f}, {high:.1f}]"


def markdown(result: dict) -> str:
    """The two agreement tables (judges; pairs) as markdown."""
    lines = [f"**Judges** ({result['items']} harmful answers; flagged = score >= {result['threshold']}; 95% "
             "intervals over items, immunize.statistics).", "",
             "| judge | scored | unparseable | flagged % | mean score % |", "| --- | --- | --- | --- | --- |"]
    for name, j in result["judges"].items():
        mean = "-" if j["mean_score"] is None else f"{j['mean_score']:.1f}"
        lines.append(f"| {name} | {j['scored']} | {j['unparseable']} | {_fmt(j['flagged'])} | {mean} |")
    if result["pairs"]:
        lines += ["", "**Pairwise agreement** (items both judges scored; Cohen's kappa: 0 = chance, 1 = perfect).", "",
                  "| judges | items | agreement % | kappa |", "| --- | --- | --- | --- |"]
        for p in result["pairs"]:
            kappa = "-" if p["kappa"] is None else f"{p['kappa']:.2f}"
            lines.append(f"| {p['a']} vs {p['b']} | {p['items']} | {_fmt(p['agreement'])} | {kappa} |")
    return "\n".join(lines) + "\n"


def run(sources: list[str], specs: list[str], out: str = "runs/judges", threshold: float = 0.5,
        limit: Optional[int] = None, seed: int = 0, progress: bool = True) -> dict:
    """Score the generations with every judge and write the outputs; returns agreement.json's content."""
    if not specs:
        raise UserError("give at least one --judge (two or more to compare them)")
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"--threshold must be in (0, 1], got {threshold}")
    parsed = [parse_spec(s) for s in specs]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise UserError(f"two judges share a label in {labels}; give each a 'label' in its spec")
    items = read_items(find_generations(sources), limit, seed)
    out_dir = Path(out)
    foreign = [p.name for p in out_dir.iterdir() if p.name not in OUTPUT_NAMES] if out_dir.is_dir() else []
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out!r} is a file, not a folder; give a new folder (e.g. runs/judges)")
    if foreign:
        raise UserError(f"--out {out!r} holds files `immunize judges` did not write ({foreign[0]!r}), and it writes "
                        "agreement.json, agreement.md and judge_scores.jsonl there; give a new or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out!r} ({e.strerror}); choose a writable folder") from e
    scores = {label: score_with(label, spec, items, out_dir, progress) for label, spec in parsed}
    result = agreement(scores, threshold, groups=[it["group"] for it in items])
    result["sources"] = sorted({it["source"] for it in items})
    rows = [{**{k: it[k] for k in ("source", "prompt", "answer", "category")},
             "scores": {label: (None if math.isnan(s[i]) else s[i]) for label, s in scores.items()}}
            for i, it in enumerate(items)]
    atomic_write_jsonl(out_dir / "judge_scores.jsonl", rows)
    atomic_write_json(out_dir / "agreement.json", result)
    atomic_write_text(out_dir / "agreement.md", markdown(result))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = OneLineArgumentParser(prog="immunize judges", description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="generations.jsonl files, or folders holding them")
    parser.add_argument("--judge", action="append", default=[], help="a judge name, a YAML mapping, or 'recorded'")
    parser.add_argument("--out", default="runs/judges", help="output folder")
    parser.add_argument("--threshold", type=float, default=0.5, help="an item is flagged when its score >= this")
    parser.add_argument("--limit", type=int, default=None, help="score a seeded random sample of this many items")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    args = parser.parse_args(argv)
    try:
        with errors_only_on_stderr():
            result = run(args.sources, args.judge, args.out, args.threshold, args.limit, args.seed)
    except UserError as err:
        fail(str(err))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
