"""Calibration: compare the settings of a swept defense family and pick one by a rule stated before the run.

A family is every defense named `family[key=value,...]` (DefenseSpec.sweep expands to them). The rule (the
bench's report.stability_tolerance / finetune_tolerance):
- alignment stage: among the settings whose capability before attack is within `stability_tolerance` points of
  the reference defense's (point estimates), the one with the lowest mean harmful score over the attack grid;
- fine-tuning stage: among the settings whose fine-tuning capability is within `finetune_tolerance` points of
  the first fine-tuning-stage defense (SFT) at every ratio, the one with the lowest mean harmful score over the
  ratios;
- when no setting qualifies, the one whose capability is closest to the reference's, flagged "none within".
Pure functions of results.json's rows.
"""
from __future__ import annotations

from typing import Optional


def family_of(name: str) -> str:
    return name.split("[", 1)[0]


def families(names: list[str]) -> dict[str, list[str]]:
    """{family: its members} for families with at least one swept member, in first-seen order."""
    out: dict[str, list[str]] = {}
    for name in names:
        if "[" in name:
            out.setdefault(family_of(name), []).append(name)
    return out


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def alignment_scores(rows: list[dict], reference: str, members: list[str]) -> list[dict]:
    """Per member: cap_before, delta_cap (vs reference, before attack), mean_hs (over the attack grid)."""
    before = {r["defense"]: r for r in rows if r["stage"] == "defended"}
    ref = before.get(reference)
    out = []
    for name in members:
        mine = before.get(name)
        attacked = [r["harmful_score"] for r in rows if r["stage"] == "attack" and r["defense"] == name
                    and (r.get("attack") or {}).get("kind", "harmful_sft") == "harmful_sft"]  # the harmful SFT grid
        delta = None if mine is None or ref is None or mine["capability"] is None or ref["capability"] is None \
            else mine["capability"] - ref["capability"]
        out.append({"name": name, "cap_before": mine and mine["capability"], "delta_cap": delta,
                    "mean_hs": _mean(attacked)})
    return out


def finetune_scores(rows: list[dict], first: str, members: list[str]) -> list[dict]:
    """Per member: worst (most negative) delta_cap over ratios vs the first fine-tuning defense, mean_hs over ratios."""
    ft = [r for r in rows if r["stage"] == "finetune"]
    out = []
    for name in members:
        mine = [r for r in ft if r["defense"] == name]
        deltas = []
        for r in mine:
            ref = next((x for x in ft if x["defense"] == first and x["finetune"]["ratio"] == r["finetune"]["ratio"]), None)
            if ref is not None and r["capability"] is not None and ref["capability"] is not None:
                deltas.append(r["capability"] - ref["capability"])
        out.append({"name": name, "delta_cap": min(deltas) if deltas else None,
                    "mean_hs": _mean([r["harmful_score"] for r in mine])})
    return out


def select(scores: list[dict], tolerance: float, signed: bool = False) -> tuple[Optional[str], bool]:
    """(chosen member, whether it meets the tolerance) by the module docstring's rule.

    signed: the tolerance bounds a drop only (fine-tuning stage: delta_cap >= -tolerance); else |delta_cap|."""
    def ok(s):
        d = s["delta_cap"]
        return d is not None and (d >= -tolerance if signed else abs(d) <= tolerance)

    qualified = [s for s in scores if ok(s) and s["mean_hs"] is not None]
    if qualified:
        return min(qualified, key=lambda s: (s["mean_hs"], abs(s["delta_cap"])))["name"], True
    known = [s for s in scores if s["delta_cap"] is not None]
    if not known:
        return None, False
    return min(known, key=lambda s: abs(s["delta_cap"]))["name"], False
