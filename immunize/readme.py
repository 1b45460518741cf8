"""Paste a bench run's tables into README.md or docs/*.md between markers, so their numbers are never typed.

    python -m immunize.readme --results runs/bench/quickstart/results.json --block quickstart \
        --tables resistance,window,stability

finds the file (README.md or one of docs/*.md) that holds the block and replaces everything between
`<!-- BEGIN quickstart -->` and `<!-- END quickstart -->` with the named report
tables (immunize.bench.report, the same code that writes report.md), preceded by a line that says which run
they come from (results file, seeds, number of evaluated models, total wall time of the cells).
`python -m immunize.readme --block methods --methods` pastes the method table generated from the registry;
`--agreement runs/judges/agreement.json --block judges` pastes an `immunize judges` run's agreement tables;
`--text FILE --block NAME` pastes a file a script printed (e.g. `python benchmarks/interval_coverage.py > FILE`),
preceded by a line naming the file and the command that made it (`--command`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from immunize.bench import report
from immunize.errors import UserError
from immunize.io import atomic_write_text


def markers(block: str) -> tuple[str, str]:
    return f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"


def render_block(results: dict, table_keys: list[str], source: str) -> str:
    tables = {t.key: t for t in report.build_tables(results)}
    missing = [k for k in table_keys if k not in tables]
    if missing:
        raise UserError(f"results have no table {missing[0]!r}; available: {sorted(tables)}")
    seconds = sum((e.get("wall_time_s") or 0) + (e.get("eval_wall_time_s") or 0) for e in results["results"])
    lines = [f"Pasted by `python -m immunize.readme` from `{source}` ({len(results['results'])} evaluated models, "
             f"seeds {results.get('seeds', [0])}, {seconds / 60:.1f} min of cell time).", ""]
    for key in table_keys:
        table = tables[key]
        lines += [f"**{table.title}.** {table.note}", "", report.markdown_table(table), ""]
    return "\n".join(lines).rstrip() + "\n"


def methods_table() -> str:
    """README's table of methods, generated from the registry (immunize.bench.registry)."""
    from immunize.bench import registry

    lines = ["| stage | name | class | toy config | real-scale config | method |", "|---|---|---|---|---|---|"]
    for d in registry.DEFENSES:
        cells = [d.stage, f"`{d.name}`", f"`{d.class_path}`" if d.class_path else "(no defense)",
                 f"`{d.config}`" if d.config else "—", f"`{d.real_config}`" if d.real_config else "—", d.paper]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The papers' own headline numbers (quoted from the papers, for the side-by-side table; not measured here).
SEAM_PAPER = {"source": "SEAM paper (arXiv 2505.12186), Llama-2-7b, HS % / zero-shot %",
              "rows": [("none", 5.0, 51.6, 5.0, 50.8), ("2e-5", 47.3, 51.7, 2.6, 47.9), ("5e-5", 77.5, 50.6, 3.1, 42.7),
                       ("8e-5", 80.4, 49.7, 5.5, 39.3), ("1e-4", 78.8, 49.8, 0.2, 25.8), ("2e-4", 79.5, 50.2, 0.0, 26.6)]}
PANACEA_PAPER = "Panacea paper: average harmful score reduced by up to 21.2 points versus the baselines, fine-tuning accuracy kept"


def paper_block(results: dict, source: str, seam: str = "seam", panacea: str = "panacea") -> str:
    """SEAM's and Panacea's headline claims next to this bench's numbers (with intervals)."""
    from immunize.bench.report import _by, _ci, _delta, _interval_note, _lookup, attack_label, attack_points, fmt_num

    lines = [f"Pasted by `python -m immunize.readme` from `{source}` (seeds {results.get('seeds', [0])}).", "",
             f"**{SEAM_PAPER['source']}** (quoted from the paper):", "",
             "| attack lr | base HS | base ZS | SEAM HS | SEAM ZS |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join([r[0]] + [f"{v:.1f}" for v in r[1:]]) + " |" for r in SEAM_PAPER["rows"]]
    ref = results["reference"]
    points = attack_points(results)
    lines += ["", f"**immunize, toy world: {ref} vs {seam}** (HS % / capability %; intervals: {_interval_note(results)}; "
              "Δ: paired difference to the reference):", "",
              f"| attack | {ref} HS | {ref} cap | {seam} HS | {seam} cap | Δ HS | Δ cap |", "|---|---|---|---|---|---|---|"]
    for label, stage, point in [("none", "defended", None)] + [(attack_label(p, points), "attack", p) for p in points]:
        rows = _by(results, stage)
        a, b = _lookup(rows, ref, point), _lookup(rows, seam, point)
        lines.append(f"| {label} | {_ci(a, 'harmful_score')} | {_ci(a, 'capability')} | {_ci(b, 'harmful_score')} | "
                     f"{_ci(b, 'capability')} | {_delta(b, 'harmful_score')} | {_delta(b, 'capability')} |")
    ft = _by(results, "finetune")
    if ft:
        first = results["finetune_defenses"][0]
        lines += ["", f"**{PANACEA_PAPER}.** immunize, toy world ({panacea} minus {first} at each harmful ratio p, paired):",
                  "", "| p | ΔHS | Δcap |", "|---|---|---|"]
        for p in sorted({r["finetune"]["ratio"] for r in ft}):
            r = next((x for x in ft if x["defense"] == panacea and x["finetune"]["ratio"] == p), None)
            lines.append(f"| {fmt_num(float(p))} | {_delta(r, 'harmful_score')} | {_delta(r, 'capability')} |")
    return "\n".join(lines) + "\n"


def verdict_block(results: dict, source: str, defenses: Optional[list[str]] = None,
                  columns: Optional[list[str]] = None, ratios: Optional[list[float]] = None) -> str:
    """The tables the README's verdicts read, without the per-seed values (the full report has them): the no-win
    check of every alignment defense under every attack protocol, and the fine-tuning stage's paired comparisons.
    defenses: only these rows (the no-win check's defense, a pair's a; the reference's own rows only when named);
    columns: only these of the no-win check
    (its defense, protocol and verdict always); ratios: only the pairs at these harmful ratios."""
    from immunize.bench.no_win import no_win_table
    from immunize.bench.report import _interval_note, fmt_ci, fmt_num

    lines = [f"Pasted by `python -m immunize.readme` from `{source}` (seeds {results.get('seeds', [0])}; intervals: "
             f"{_interval_note(results, per_seed=False)}; each seed's value is in the run's report.md).", ""]
    table = no_win_table(results, per_seed=False)
    if table is not None:
        always = (table.columns[0], table.columns[1], table.columns[-1])
        unknown = [c for c in columns or [] if c not in table.columns]
        if unknown:
            raise UserError(f"--columns: the no-win check has no column {unknown[0]!r}; it has {table.columns}")
        keep = [i for i, c in enumerate(table.columns) if c in always or (
            c in columns if columns else c not in ("cos(g_harm, g_benign)", "est_norm"))]
        table.columns = [table.columns[i] for i in keep]
        table.rows = [[row[i] for i in keep] for row in table.rows
                      if (defenses is None and row[-1] != "(reference)") or (defenses is not None and row[0] in defenses)]
        lines += [f"**{table.title}.** {table.note}", "", report.markdown_table(table), ""]
    pairs = [p for p in results.get("pairs") or [] if p["stage"] == "finetune" and (defenses is None or p["a"] in defenses)
             and (ratios is None or float(p["finetune"]["ratio"]) in ratios)]
    if pairs:
        lines += ["**Fine-tuning stage: paired comparisons** (a minus b on the same items and seeds):", "",
                  "| a | b | p | ΔHS | Δcap |", "|---|---|---|---|---|"]
        for p in pairs:
            cells = [fmt_ci(p[m][0], p[m], signed=True) if m in p else report.NONE for m in ("harmful_score", "capability")]
            lines.append(f"| {p['a']} | {p['b']} | {fmt_num(float(p['finetune']['ratio']))} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def agreement_block(result: dict, source: str) -> str:
    """An `immunize judges` run's tables (immunize.judges.command.markdown), with the line that says where from."""
    from immunize.judges.command import markdown

    files = result.get("sources") or []
    return (f"Pasted by `python -m immunize.readme` from `{source}` ({result['items']} harmful answers from "
            f"{len(files)} generations files).\n\n" + markdown(result))


def block_file(block: str, root: Path = Path(".")) -> Path:
    """The one markdown file among README.md and docs/*.md that holds the block's markers."""
    begin, _ = markers(block)
    found = [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.is_file() and begin in p.read_text()]
    if len(found) != 1:
        where = "none" if not found else ", ".join(map(str, found))
        raise UserError(f"block {block!r}: expected its {begin} marker in exactly one of README.md and docs/*.md, "
                        f"found {where}; give the file with --readme")
    return found[0]


def paste(readme: Path, block: str, text: str) -> str:
    """README text with the block's content replaced (the markers stay)."""
    content = readme.read_text()
    begin, end = markers(block)
    if begin not in content or end not in content or content.index(begin) > content.index(end):
        raise UserError(f"{readme} has no block {begin} ... {end}; add the two marker lines where the tables go")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}{end}{tail}"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m immunize.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", help="results.json of a finished bench run")
    parser.add_argument("--block", required=True, help="marker name (in README.md or one of docs/*.md)")
    parser.add_argument("--tables", help="comma-separated report table keys")
    parser.add_argument("--methods", action="store_true", help="paste the registry's method table instead")
    parser.add_argument("--paper", action="store_true", help="paste the papers' claims next to --results instead")
    parser.add_argument("--verdicts", action="store_true",
                        help="paste --results' no-win check and fine-tuning pairs (no per-seed values) instead")
    parser.add_argument("--defenses", help="with --verdicts: comma-separated defense names to keep (default: all)")
    parser.add_argument("--columns", help="with --verdicts: comma-separated no-win check columns to keep")
    parser.add_argument("--ratios", help="with --verdicts: comma-separated harmful ratios of the pairs to keep")
    parser.add_argument("--agreement", help="paste an `immunize judges` run's agreement.json instead")
    parser.add_argument("--text", help="paste this file's content (a table a script printed) instead")
    parser.add_argument("--command", default=None, help="with --text: the command that printed the file")
    parser.add_argument("--readme", default=None, help="the markdown file (default: the one holding the block)")
    args = parser.parse_args(argv)
    try:
        if args.methods:
            text = methods_table()
        elif args.text:
            if not Path(args.text).is_file():
                raise UserError(f"{args.text}: no such file; run the script that prints it first")
            made_by = f" (printed by `{args.command}`)" if args.command else ""
            text = f"Pasted by `python -m immunize.readme` from `{args.text}`{made_by}.\n\n" + Path(args.text).read_text()
        elif args.agreement:
            if not Path(args.agreement).is_file():
                raise UserError(f"{args.agreement}: no such agreement file; run `immunize judges` first")
            text = agreement_block(json.loads(Path(args.agreement).read_text()), args.agreement)
        elif args.verdicts:
            if not args.results or not Path(args.results).is_file():
                raise UserError("--verdicts needs --results of a finished bench run")
            def listed(text):
                return [x.strip() for x in text.split(",") if x.strip()] if text else None

            ratios = [float(r) for r in listed(args.ratios)] if args.ratios else None
            text = verdict_block(json.loads(Path(args.results).read_text()), args.results, listed(args.defenses),
                                 listed(args.columns), ratios)
        elif args.paper:
            if not args.results or not Path(args.results).is_file():
                raise UserError("--paper needs --results of a finished bench run")
            text = paper_block(json.loads(Path(args.results).read_text()), args.results)
        else:
            if not args.results or not args.tables:
                raise UserError("give --results and --tables (or --methods)")
            path = Path(args.results)
            if not path.is_file():
                raise UserError(f"{path}: no such results file; run the bench first")
            results = json.loads(path.read_text())
            text = render_block(results, [k.strip() for k in args.tables.split(",") if k.strip()], args.results)
        target = Path(args.readme) if args.readme else block_file(args.block)
        atomic_write_text(target, paste(target, args.block, text))
    except UserError as err:
        print(f"immunize.readme: error: {err}", file=sys.stderr)
        sys.exit(2)
    what = ("the method table" if args.methods else args.text if args.text else "the judge agreement" if args.agreement
            else "the papers' claims" if args.paper else args.tables)
    print(f"pasted {what} into {args.readme or block_file(args.block)} ({args.block})")


if __name__ == "__main__":
    main()
