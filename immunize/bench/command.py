"""`immunize bench --config FILE --out DIR`: plan, validate, run the cells, write the report.

With no --config the embedded default configs/bench/quickstart.yaml is used (toy world, minutes on a CPU).
Bad input: one line `immunize: error: ...` and exit code 2, before any training. A failed cell: exit 1
(2 when the cell itself reported bad input). Ctrl-C: exit 130; rerun the same command to resume.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from immunize.bench.schema import BenchConfig
from immunize.bench.stages import find_file
from immunize.errors import UserError, errors_only_on_stderr, fail, find_user_error, summarize_parser_error
from immunize.io import atomic_write_json, atomic_write_text

QUICKSTART_CONFIG = "configs/bench/quickstart.yaml"
PARTIAL_RESULTS_EVERY_S = 60.0


def _with_default_config(argv: list[str]) -> list[str]:
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    return ["--config", str(find_file(QUICKSTART_CONFIG, "the default bench config"))] + argv


def _parse(argv: list[str]) -> tuple[BenchConfig, dict]:
    from immunize.bench.schema import parse

    try:
        return parse(argv)
    except UserError:
        raise
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is not None:
            raise user_error
        if type(err).__name__ in ("ArgumentError", "ParserError") or "jsonargparse" in type(err).__module__:
            raise UserError(summarize_parser_error(str(err))) from err
        raise


def write_outputs(plan, bench: BenchConfig, out: Path, cells_dir: Path, final: bool, config: dict) -> dict:
    """results.json always; report.md, plots and W&B when `final`. Returns the results dict."""
    from immunize.bench import report
    from immunize.bench.results import collect

    results = collect(plan, cells_dir, bench.heldout_categories, bench.report.threshold,
                      bench.attack.window if bench.attack is not None else None,
                      {"stability_tolerance": bench.report.stability_tolerance,
                       "finetune_tolerance": bench.report.finetune_tolerance}, bench.report.pairs,
                      bench.report.capability_bound)
    atomic_write_json(out / "results.json", results)
    if not final:
        return results
    from immunize.bench.plots import make_plots

    tables = report.build_tables(results)
    images = make_plots(results, out)
    atomic_write_text(out / "report.md", report.render(results, tables, images))
    if bench.wandb.enabled:
        from immunize.bench.wandb_log import log_cell_runs, log_report

        if bench.wandb.cell_runs:
            log_cell_runs(bench.wandb, plan.cells, cells_dir, out)
        run_dir = log_report(bench.wandb, out, config, tables, images, results)
        if run_dir and bench.wandb.mode == "offline" and bench.progress != "quiet":
            print(f"immunize bench: W&B run (offline) in {run_dir}; upload with `wandb sync {run_dir}`", file=sys.stderr)
    for table in tables:
        if table.key in ("resistance", "window", "resistance_summary", "search", "lm_eval", "stability", "finetune",
                         "pairs", "judges", "judge_flags", "judge_agreement") \
                or table.key.startswith("calibration_"):
            print(f"\n{table.title}\n{report.markdown_table(table)}")
    return results


def _summary(cell, cells_dir: Path) -> str:
    from immunize.bench.cells import read_json

    d = cell.directory(cells_dir)
    if cell.kind == "judge":
        from immunize.bench.judging import summary

        return summary(cell, cells_dir)
    if cell.kind == "test":
        m = read_json(d / "metrics.json") or {}
        hs, cap = m.get("harmful_score"), m.get("capability")
        return ", ".join(x for x in (f"harmful {hs:.1f}%" if hs is not None else "",
                                     f"capability {cap:.1f}%" if cap is not None else "") if x)
    steps = (read_json(d / "train.json") or {}).get("steps")
    return f"{steps} steps" if steps is not None else ""


def plan_summary(graph: list[dict]) -> str:
    """One line: how many cells need which devices, and how many models the fits export (disk: one model each)."""
    from collections import Counter

    def where(res: dict) -> str:
        nodes = f" x {res['num_nodes']} nodes" if res["num_nodes"] != 1 else ""
        return f"{res['accelerator']} x{res['devices']}{nodes}"

    counts = Counter((row["kind"], where(row["resources"])) for row in graph)
    names = {"fit": "fits", "test": "evals", "judge": "judge runs (eval.judges)"}
    parts = [f"{n} {names.get(kind, kind)} on {res}" for (kind, res), n in sorted(counts.items())]
    fits = sum(row["kind"] == "fit" for row in graph)
    return f"plan: {len(graph)} cells ({'; '.join(parts)}); {fits} exported models (disk: {fits} x the model's size)"


def launcher_for(bench: BenchConfig, out: Path, mode: str):
    """The slurm (submitit) or ray launcher of the bench's launcher block."""
    from immunize.bench.launchers import RayLauncher, SubmititLauncher

    spec = bench.launcher
    if spec.name == "slurm":
        folder = Path(spec.folder) if spec.folder else out / "launcher"
        return SubmititLauncher(folder, spec.cluster, spec.partition, spec.account, spec.qos, spec.time_min,
                                bench.trainer.threads)
    return RayLauncher(spec.address, bench.trainer.threads)


def run_bench(bench: BenchConfig, config: dict, show_plan: bool = False, plan=None) -> int:
    """Run (or, with show_plan or dry_run, list) the validated plan; `plan` is validate(bench)'s, built here when not
    given. Returns the exit code."""
    from immunize.bench.cells import plan_graph
    from immunize.bench.disk import ModelPruner
    from immunize.bench.judging import refresh as refresh_judges
    from immunize.bench.plan_cost import cost_lines, plan_cost
    from immunize.bench.runner import CellFailed, Runner, lock
    from immunize.bench.validate import BENCH_MARKER, validate

    plan = plan if plan is not None else validate(bench)
    out = Path(bench.out)
    cells_dir = Path(bench.cells_dir) if bench.cells_dir else out / "cells"
    if bench.dry_run or show_plan:
        graph = plan_graph(plan.cells, cells_dir, bench.trainer.threads)
        cost = plan_cost(plan.cells) if show_plan else None
        if show_plan:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "plan.json", {"cells_dir": str(cells_dir), "cells": graph, "cost": cost})
            if not (out / BENCH_MARKER).exists():
                atomic_write_json(out / BENCH_MARKER, config)
        for i, row in enumerate(graph, start=1):
            res = row["resources"]
            needs = f" <- {row['needs'][0]}" if row["needs"] else ""
            where = f"{res['accelerator']} x{res['devices']}" + (f" x{res['num_nodes']} nodes" if res["num_nodes"] != 1 else "")
            print(f"[cell {i}/{len(graph)}] {row['state']:10} {row['kind']:4} {row['label']}  ({row['cell']}{needs}; {where})")
        print(plan_summary(graph))
        if cost is not None:
            print("\n".join(cost_lines(cost)))
        if show_plan:
            print(f"immunize bench: plan written to {out / 'plan.json'}", file=sys.stderr)
        if bench.attack is not None and bench.attack.search is not None:
            s = bench.attack.search
            print(f"plus attack.search: {s.trials} {s.sampler} trials per defense and seed (2 cells each, planned as "
                  f"the study runs; study in {out / 'search.db'})")
        return 0
    locks = [lock(out)] + ([lock(cells_dir)] if cells_dir.resolve() != out.resolve() else [])
    atomic_write_json(out / BENCH_MARKER, config)
    mode = bench.progress
    if mode == "auto":
        mode = "bars" if sys.stdout.isatty() else "lines"
    fits, judged = len(plan.fits), sum(c.kind == "judge" for c in plan.cells)
    tests = len(plan.cells) - fits - judged
    done = sum(c.is_done(cells_dir) for c in plan.cells)
    if mode != "quiet":
        judges = f", {judged} judge runs" if judged else ""
        print(f"immunize bench: {len(plan.cells)} cells ({fits} fits, {tests} evals{judges}), {done} already done; "
              f"cells in {cells_dir}, report in {out}", file=sys.stderr, flush=True)

    last_partial = [-PARTIAL_RESULTS_EVERY_S]
    pruner = ModelPruner(cells_dir, enabled=not bench.keep_models)
    searching = bench.attack is not None and bench.attack.search is not None

    def on_done(cell, index):
        if not searching:  # the search's trials read the defenses' models: they are removed after it (sweep)
            pruner.after(cell)
        # a partial results.json while cells finish, at most every PARTIAL_RESULTS_EVERY_S: rebuilding it reads every
        # evaluated model's items, so after each of N evals it would cost O(N^2) (minutes on a resumed 100-model run)
        if cell.kind == "test" and time.monotonic() - last_partial[0] >= PARTIAL_RESULTS_EVERY_S:
            write_outputs(plan, bench, out, cells_dir, final=False, config=config)
            last_partial[0] = time.monotonic()
        return _summary(cell, cells_dir)

    def run_cells(cells) -> dict:
        cells = pruner.revive(cells)
        refresh_judges(cells, cells_dir)  # a judge cell whose eval cell wrote other generations since runs again
        if bench.launcher.name != "local":
            return launcher_for(bench, out, mode).run(cells, cells_dir, mode, on_done)
        return Runner(cells_dir, mode, bench.trainer.threads, quiet=mode == "quiet").run(cells, on_done)

    start = time.monotonic()
    try:
        counts = run_cells(plan.cells)
        if bench.attack is not None and bench.attack.search is not None:
            from immunize.bench.search import run_search

            if mode != "quiet":
                print(f"immunize bench: attacker search ({bench.attack.search.trials} trials per defense; study in "
                      f"{out / 'search.db'})", file=sys.stderr, flush=True)
            searched = run_search(plan.planner, cells_dir, out, bench.report.capability_bound, run_cells)
            judged = [c for c in plan.cells if c.kind == "judge" and not c.is_done(cells_dir)]  # eval.judges on trials
            extra = run_cells(judged) if judged else {"run": 0, "skipped": 0}
            counts = {k: counts[k] + searched[k] + extra[k] for k in counts}
    except CellFailed as err:
        print(f"immunize: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("\nimmunize bench: interrupted; finished cells are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    pruner.sweep()
    write_outputs(plan, bench, out, cells_dir, final=True, config=config)
    if mode != "quiet":
        freed = f"; keep_models: false removed {pruner.freed / 1e6:.1f} MB of models" if not bench.keep_models else ""
        print(f"\nimmunize bench: {counts['run']} cells run, {counts['skipped']} reused, "
              f"{time.monotonic() - start:.0f}s; wrote {out / 'results.json'}, {out / 'report.md'} and plots{freed}",
              file=sys.stderr)
    for handle in locks:
        handle.close()
    return 0


def bench_main(argv: list[str]) -> None:
    """Entry point of `immunize bench ...` (called by immunize.main)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        argv = list(argv)
        show_plan, shrunk = "--plan" in argv, "--shrink" in argv
        with errors_only_on_stderr():  # warnings of parsing and validation must not precede an error line
            from immunize.bench.validate import validate

            bench, config = _parse(_with_default_config([a for a in argv if a not in ("--plan", "--shrink")]))
            shrink = None
            if shrunk:
                from immunize.bench import shrink as shrinking

                shrink = shrinking.apply(bench, argv)
            plan = validate(bench, shrink.cell if shrink is not None else None)
        if shrink is not None:
            shrink.report()
            config = {**config, "out": bench.out, "shrink": dict(shrink.replaced)}
        code = run_bench(bench, config, show_plan, plan)
    except UserError as err:
        fail(str(err))
    sys.exit(code)
