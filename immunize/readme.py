"""Paste a bench run's tables into README.md between markers, so the README's numbers are never typed.

    python -m immunize.readme --results runs/bench/quickstart/results.json --block quickstart \
        --tables resistance,window,stability

replaces everything between `<!-- BEGIN quickstart -->` and `<!-- END quickstart -->` with the named report
tables (immunize.bench.report, the same code that writes report.md), preceded by a line that says which run
they come from (results file, seeds, number of evaluated models, total wall time of the cells).
`python -m immunize.readme --block methods --methods` pastes the method table generated from the registry.
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
    parser.add_argument("--block", required=True, help="marker name in README.md")
    parser.add_argument("--tables", help="comma-separated report table keys")
    parser.add_argument("--methods", action="store_true", help="paste the registry's method table instead")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    try:
        if args.methods:
            text = methods_table()
        else:
            if not args.results or not args.tables:
                raise UserError("give --results and --tables (or --methods)")
            path = Path(args.results)
            if not path.is_file():
                raise UserError(f"{path}: no such results file; run the bench first")
            results = json.loads(path.read_text())
            text = render_block(results, [k.strip() for k in args.tables.split(",") if k.strip()], args.results)
        atomic_write_text(Path(args.readme), paste(Path(args.readme), args.block, text))
    except UserError as err:
        print(f"immunize.readme: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"pasted {'the method table' if args.methods else args.tables} into {args.readme} ({args.block})")


if __name__ == "__main__":
    main()
