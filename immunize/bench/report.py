"""results.json -> tables for the four immunization conditions and the fine-tuning stage -> report.md.

Pure functions of the results dict (no files, no training), so they are tested on a known results.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from immunize.bench.planner import fmt_num

NONE = "—"


@dataclass
class Table:
    key: str
    title: str
    note: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)


def fmt(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return NONE
    value = 0.0 if round(value, 1) == 0 else value  # no "-0.0"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _by(results: dict, stage: str) -> list[dict]:
    return [r for r in results["results"] if r["stage"] == stage]


def _key(attack: dict) -> tuple:
    return (attack["lr"], attack.get("samples"), attack.get("mode"), attack.get("optimizer"))


def attack_points(results: dict) -> list[dict]:
    """The distinct attack settings, in order of appearance."""
    seen, out = set(), []
    for r in _by(results, "attack"):
        if _key(r["attack"]) not in seen:
            seen.add(_key(r["attack"]))
            out.append(r["attack"])
    return out


def attack_label(attack: dict, points: list[dict]) -> str:
    """lr always; the other axes only when they vary across the grid."""
    parts = [f"lr={fmt_num(attack['lr'])}"]
    for axis, prefix in (("samples", "n="), ("mode", ""), ("optimizer", "")):
        if len({p.get(axis) for p in points}) > 1:
            parts.append(f"{prefix}{attack.get(axis)}")
    return " ".join(parts)


def split_harm(r: dict, heldout: list[str]) -> tuple[Optional[float], Optional[float]]:
    """(mean harmful score over seen categories, over held-out categories) from the per-category scores."""
    scores = r.get("harmful_scores") or {}
    return (_mean([v for c, v in scores.items() if c not in heldout]),
            _mean([v for c, v in scores.items() if c in heldout]))


def _lookup(rows: list[dict], defense: str, attack: Optional[dict] = None) -> Optional[dict]:
    for r in rows:
        if r["defense"] == defense and (attack is None or _key(r["attack"]) == _key(attack)):
            return r
    return None


def resistance(results: dict) -> list[Table]:
    defenses, phi = results["defenses"], results["threshold"]
    points, attacked, before = attack_points(results), _by(results, "attack"), _by(results, "defended")
    grid = Table("resistance", "Resistance: harmful score and capability under attack",
                 "Harmful score (HS, % of harmful prompts answered harmfully; lower is better) and capability "
                 "(cap, mean benign task accuracy %) after each attack of the grid; first row: no attack.",
                 ["attack"] + [f"{d} {m}" for d in defenses for m in ("HS", "cap")])
    rows = [("no attack", before, None)] + [(attack_label(p, points), attacked, p) for p in points]
    for label, source, point in rows:
        cells = []
        for d in defenses:
            r = _lookup(source, d, point)
            cells += [fmt(r and r["harmful_score"]), fmt(r and r["capability"])]
        grid.rows.append([label] + cells)
    summary = Table("resistance_summary", "Resistance summary",
                    f"Worst harmful score over the attack grid, attacks that push HS above phi = {fmt(phi)}%, and "
                    "mean capability left under attack (a no-win defense: high HS only with collapsed capability).",
                    ["defense", "worst HS", f"attacks with HS > {fmt(phi)}", "mean cap under attack", "mean attack steps"])
    for d in defenses:
        mine = [r for r in attacked if r["defense"] == d]
        hs = [r["harmful_score"] for r in mine if r["harmful_score"] is not None]
        summary.rows.append([d, fmt(max(hs) if hs else None), f"{sum(h > phi for h in hs)}/{len(hs)}",
                             fmt(_mean([r["capability"] for r in mine])),
                             fmt(_mean([r["steps"] for r in mine]))])
    return [grid, summary]


def stability(results: dict) -> Table:
    rows = _by(results, "defended")
    ref = _lookup(rows, results["reference"])
    tasks = sorted({t for r in rows for t in r["accuracy"]})
    table = Table("stability", "Stability: capability before any attack",
                  f"Each defense's model before attack against the reference ({results['reference']}): "
                  "capability and its change, harmful score, per-task accuracy, and what the defense stage cost.",
                  ["defense", "cap", f"Δcap vs {results['reference']}", "HS"] + [f"acc {t}" for t in tasks]
                  + ["steps", "time (s)"])
    for d in results["defenses"]:
        r = _lookup(rows, d)
        if r is None:
            continue
        delta = None if ref is None or r["capability"] is None or ref["capability"] is None else r["capability"] - ref["capability"]
        table.rows.append([d, fmt(r["capability"]), fmt(delta, signed=True), fmt(r["harmful_score"])]
                          + [fmt(r["accuracy"].get(t)) for t in tasks]
                          + [NONE if r["steps"] is None else str(r["steps"]), fmt(r["wall_time_s"])])
    return table


def generalization(results: dict) -> Table:
    heldout, defenses = results["heldout_categories"], results["defenses"]
    points = attack_points(results)
    table = Table("generalization", "Generalization: harm categories the defense did not train on",
                  f"Mean harmful score over the seen categories vs the held-out ones ({', '.join(heldout)}), "
                  "from the per-category scores; a defense generalizes when held-out HS stays as low as seen HS.",
                  ["attack"] + [f"{d} {m}" for d in defenses for m in ("seen", "held-out")])
    rows = [("no attack", _by(results, "defended"), None)] + [(attack_label(p, points), _by(results, "attack"), p)
                                                               for p in points]
    for label, source, point in rows:
        cells = []
        for d in defenses:
            r = _lookup(source, d, point)
            seen, held = split_harm(r, heldout) if r else (None, None)
            cells += [fmt(seen), fmt(held)]
        table.rows.append([label] + cells)
    return table


def trainability(results: dict) -> Table:
    after, before = _by(results, "benign"), _by(results, "defended")
    ref = _lookup(after, results["reference"])
    tasks = sorted({t for r in after for t in r["accuracy"]})
    table = Table("trainability", "Trainability: the same benign fine-tune on each defense",
                  f"Capability after a benign fine-tune, against the reference ({results['reference']}) after the same "
                  "fine-tune, and per-task accuracy after it (the fine-tuned task should rise); HS after it shows "
                  "how much safety a benign fine-tune erodes.",
                  ["defense", "cap before", "cap after", f"Δcap vs {results['reference']}", "HS after"]
                  + [f"acc {t}" for t in tasks] + ["steps"])
    for d in results["defenses"]:
        r = _lookup(after, d)
        if r is None:
            continue
        b = _lookup(before, d)
        delta = None if ref is None or r["capability"] is None or ref["capability"] is None else r["capability"] - ref["capability"]
        table.rows.append([d, fmt(b and b["capability"]), fmt(r["capability"]), fmt(delta, signed=True),
                           fmt(r["harmful_score"])] + [fmt(r["accuracy"].get(t)) for t in tasks]
                          + [NONE if r["steps"] is None else str(r["steps"])])
    return table


def finetune_stage(results: dict) -> Table:
    rows = _by(results, "finetune")
    defenses = results["finetune_defenses"]
    ratios = sorted({r["finetune"]["ratio"] for r in rows})
    origin = rows[0]["finetune"]["model_from"] if rows else NONE
    table = Table("finetune", "Fine-tuning stage: defenses during a user's fine-tune on a harmful mix",
                  f"The {origin} model fine-tuned on a task mix with a fraction p of harmful samples, with each "
                  "fine-tuning-stage defense: harmful score and capability (fine-tuning accuracy) per p.",
                  ["p"] + [f"{d} {m}" for d in defenses for m in ("HS", "cap")])
    for p in ratios:
        cells = []
        for d in defenses:
            r = next((x for x in rows if x["defense"] == d and x["finetune"]["ratio"] == p), None)
            cells += [fmt(r and r["harmful_score"]), fmt(r and r["capability"])]
        table.rows.append([fmt_num(float(p))] + cells)
    return table


def build_tables(results: dict) -> list[Table]:
    """Every table that has data: resistance (+summary), stability, generalization, trainability, fine-tuning stage."""
    tables = []
    if _by(results, "attack") or _by(results, "defended"):
        if _by(results, "attack"):
            tables += resistance(results)
        if _by(results, "defended"):
            tables.append(stability(results))
        tables.append(generalization(results))
    if _by(results, "benign"):
        tables.append(trainability(results))
    if _by(results, "finetune"):
        tables.append(finetune_stage(results))
    return tables


def markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join(" --- " for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def render(results: dict, tables: list[Table], images: Optional[dict[str, list[str]]] = None) -> str:
    """report.md: a heading per table, its note, the table, and the images filed under its key."""
    images = images or {}
    n = len(results["results"])
    out = ["# immunize bench report", "",
           f"{n} evaluated models; reference defense: {results['reference']}; held-out categories: "
           f"{', '.join(results['heldout_categories'])}; acceptable harmful score phi = {fmt(results['threshold'])}%.",
           "HS: harmful score %, cap: capability (mean benign task accuracy %). Raw numbers: results.json.", ""]
    for table in tables:
        out += [f"## {table.title}", "", table.note, "", markdown_table(table), ""]
        out += [f"![{name}]({name})" for name in images.get(table.key, [])]
        if images.get(table.key):
            out.append("")
    return "\n".join(out)
