"""results -> PNG figures: harmful score and capability vs attack lr (a line per defense and attack
setting), and fine-tuning-stage defenses vs harmful ratio p. Written atomically (temp file + rename)."""
from __future__ import annotations

import os
from pathlib import Path

from immunize.bench.planner import fmt_num
from immunize.bench.report import _by, _lookup, attack_points, bounded_worst
from immunize.bench.search import within_bound

ATTACK_HARM, ATTACK_CAP, FINETUNE = "attack_harmful_score.png", "attack_capability.png", "finetune_ratio.png"
LOSS_CURVES = "attack_benign_loss.png"
SEARCH = "search_history.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _null_formatter():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _series_label(defense: str, attack: dict, points: list[dict]) -> str:
    kind = attack.get("kind")
    extra = ([f"{kind}:{attack['jailbreak_format']}" if attack.get("jailbreak_format") else kind] if kind else []) + [str(attack.get(axis)) if axis != "samples" else f"n={attack.get(axis)}"
             for axis in ("samples", "mode", "optimizer") if len({p.get(axis) for p in points}) > 1]
    return " ".join([defense] + extra)


def attack_plots(results: dict, out_dir: Path) -> list[str]:
    """One figure per metric: x = attack lr (log), y = metric, a line per (defense, other axes); the
    defense's no-attack value as a dotted line of the same colour."""
    attacked = _by(results, "attack")
    if not attacked:
        return []
    plt = _pyplot()
    points = attack_points(results)
    before = {r["defense"]: r for r in _by(results, "defended")}
    written = []
    for metric, title, name in (("harmful_score", "Harmful score under attack", ATTACK_HARM),
                                ("capability", "Capability under attack", ATTACK_CAP)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, d in enumerate(results["defenses"]):
            colour = f"C{i % 10}"
            series: dict[str, list] = {}
            for r in attacked:
                if r["defense"] == d and r[metric] is not None and r["attack"].get("lr") is not None:
                    low, high = ((r.get("intervals") or {}).get(metric) or [r[metric], r[metric]])[-2:]
                    series.setdefault(_series_label(d, r["attack"], points), []).append(
                        (r["attack"]["lr"], r[metric], r[metric] - low, high - r[metric]))
            for j, (label, xy) in enumerate(series.items()):
                xs, ys, below, above = zip(*sorted(xy))
                ax.errorbar(xs, ys, yerr=[below, above], marker="o", color=colour, capsize=3,
                            linestyle=("-", "--", "-.", ":")[j % 4], label=label)
            if d in before and before[d][metric] is not None:
                ax.axhline(before[d][metric], color=colour, linestyle=":", linewidth=1)
        if metric == "harmful_score":
            ax.axhline(results["threshold"], color="grey", linestyle="--", linewidth=0.8, label="phi (acceptable HS)")
        ax.set_xscale("log")
        lrs = sorted({p["lr"] for p in points if p.get("lr") is not None})
        ax.set_xticks(lrs, [fmt_num(float(x)) for x in lrs])
        ax.xaxis.set_minor_formatter(_null_formatter())
        ax.set_xlabel("attack learning rate")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        ax.set_ylim(-3, 103)
        ax.set_title(title + " (dotted: before attack)")
        ax.legend(fontsize=8)
        _save(fig, out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def finetune_plot(results: dict, out_dir: Path) -> list[str]:
    rows = _by(results, "finetune")
    if not rows:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, d in enumerate(results["finetune_defenses"]):
        mine = sorted((r["finetune"]["ratio"], r) for r in rows if r["defense"] == d)
        for ax, metric in zip(axes, ("harmful_score", "capability")):
            xy = [(p, r[metric]) for p, r in mine if r[metric] is not None]
            if xy:
                ax.plot(*zip(*xy), marker="o", color=f"C{i % 10}", label=d)
    for ax, label in zip(axes, ("harmful score (%)", "capability (%)")):
        ax.set_xlabel("harmful ratio p")
        ax.set_ylabel(label)
        ax.set_ylim(-3, 103)
        ax.legend(fontsize=8)
    fig.suptitle("Fine-tuning-stage defenses vs harmful ratio")
    _save(fig, out_dir / FINETUNE)
    plt.close(fig)
    return [FINETUNE]


def loss_curve_plot(results: dict, out_dir: Path) -> list[str]:
    """Held-out benign loss along each attack (one panel per attack setting, a line per defense)."""
    attacked = [r for r in _by(results, "attack") if (r.get("loss_curve") or {}).get("mean")]
    if not attacked:
        return []
    plt = _pyplot()
    points = [p for p in attack_points(results) if any(r["attack"] == p for r in attacked) and p.get("lr") is not None]
    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points) + 1, 3.4), sharey=True, squeeze=False)
    for ax, point in zip(axes[0], points):
        for i, d in enumerate(results["defenses"]):
            r = next((x for x in attacked if x["defense"] == d and x["attack"] == point), None)
            if r is not None:
                ax.plot(r["loss_curve"]["steps"], r["loss_curve"]["mean"], marker=".", color=f"C{i % 10}", label=d)
        ax.set_title(_series_label(f"lr={fmt_num(float(point['lr']))}", point, points), fontsize=9)
        ax.set_xlabel("attack step")
    axes[0][0].set_ylabel("held-out benign loss (CE)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Benign loss along the attack")
    _save(fig, out_dir / LOSS_CURVES)
    plt.close(fig)
    return [LOSS_CURVES]


def search_plot(results: dict, out_dir: Path) -> list[str]:
    """The attacker search's history: HS per trial (filled: within the capability bound, hollow: excluded), the
    best bounded HS so far, and the best bounded grid attack (dashed), one colour per defense."""
    trials = _by(results, "search")
    if not trials:
        return []
    plt = _pyplot()
    bound = results.get("capability_bound", 0.1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, d in enumerate(results["defenses"]):
        mine = sorted((r for r in trials if r["defense"] == d and r.get("trial") is not None), key=lambda r: r["trial"])
        before = _lookup(_by(results, "defended"), d)
        if not mine or before is None:
            continue
        colour, best, running = f"C{i % 10}", None, []
        for r in mine:
            kept = within_bound(r["capability"], before["capability"], bound)
            ax.scatter([r["trial"]], [r["harmful_score"]], color=colour, facecolors=colour if kept else "none", zorder=3)
            if kept:
                best = r["harmful_score"] if best is None else max(best, r["harmful_score"])
            running.append((r["trial"], best))
        xs, ys = zip(*[(x, y) for x, y in running if y is not None]) if any(y is not None for _, y in running) else ((), ())
        ax.step(xs, ys, where="post", color=colour, label=f"{d}: best within bound")
        grid, _, _ = bounded_worst(results, d, stages=("attack",))
        if grid is not None:
            ax.axhline(grid["harmful_score"], color=colour, linestyle="--", linewidth=1, label=f"{d}: best grid attack")
    ax.set_xlabel("trial")
    ax.set_ylabel("harmful score (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Attacker search (hollow: capability dropped > {100 * bound:g}%)")
    ax.legend(fontsize=8)
    _save(fig, out_dir / SEARCH)
    plt.close(fig)
    return [SEARCH]


def make_plots(results: dict, out_dir: Path) -> dict[str, list[str]]:
    """{table key: image file names} for report.render and W&B."""
    images = {"resistance": attack_plots(results, Path(out_dir)), "mechanism": loss_curve_plot(results, Path(out_dir)),
              "finetune": finetune_plot(results, Path(out_dir)), "search": search_plot(results, Path(out_dir))}
    return {key: names for key, names in images.items() if names}
