"""Where the bench's cells run: here, one after the other ("local"), as Slurm jobs through submitit ("slurm"), or as
Ray tasks ("ray"). Every launcher executes the same plan (cells.plan_graph): a cell runs only after the cell whose
model it reads, finished cells are reused, and a cell that failed is run again from scratch on the next call.

- slurm: one submitit job per cell, with the cell's resources (nodes, GPUs per node from its trainer section;
  partition, account, time from the launcher block); on a Slurm cluster a cell's job depends on its input cell's job
  (sbatch --dependency=afterok), so Slurm orders them. submitit's "local" and "debug" clusters (for tests and
  laptops) have no dependencies: there a cell is submitted once its input's job has finished. A multi-node fit
  runs as one Slurm task per GPU, each entering `immunize fit` itself (Lightning's SLURMEnvironment wires them).
- ray: one Ray task per cell with the cell's CPUs and GPUs; a cell's task takes its input cell's result as an
  argument, so Ray starts it after that task. An existing cluster (address) or a local Ray started here. A
  worker process that dies mid-cell (kill -9, a node lost) is retried by Ray itself inside the same call (its
  default for system failures); a cell that fails (an error in the cell) is not, it is reported and rerun on the
  next call as under the other launchers.
The cell itself always runs as `immunize fit|test --config <cell>/cell.yaml` (runner.Runner.run_cell), so its
directory, log, markers and results are the same whichever launcher ran it.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from immunize.bench.cells import Cell, cell_resources
from immunize.bench.runner import CellFailed, Runner
from immunize.errors import UserError


def _pending(cells: list[Cell], cells_dir: Path) -> list[Cell]:
    return [c for c in cells if not c.is_done(cells_dir)]


def execute_cell(cell: Cell, cells_dir: str, mode: str, threads: Optional[int]) -> float:
    """Run one cell where the launcher placed it (a submitit job or a Ray task); returns its wall time.

    A cell of several nodes runs in-process in every Slurm task (each task is one rank); others run as the local
    runner runs them (a child process with the cell's log)."""
    cells_dir = Path(cells_dir)
    if cell_resources(cell)["num_nodes"] > 1:
        import submitit

        from immunize.bench.runner import CELL_CONFIG, runtime_config
        from immunize.bench.stages import to_yaml
        from immunize.cli import main

        env = submitit.JobEnvironment()
        d = cell.directory(cells_dir)
        if env.global_rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            (d / CELL_CONFIG).write_text(to_yaml(runtime_config(cell, cells_dir, False, 0)))
        while not (d / CELL_CONFIG).exists():
            time.sleep(1)
        start = time.monotonic()
        main([cell.kind, "--config", str(d / CELL_CONFIG)])
        return time.monotonic() - start
    return Runner(cells_dir, mode if mode != "bars" else "lines", threads, quiet=True).run_cell(cell)


class SubmititLauncher:
    """Cells as submitit jobs (see the module docstring).

    Args:
        folder: where submitit keeps each job's script and logs.
        cluster: submitit's cluster: "slurm" (default), "local" (subprocesses here) or "debug" (in this process).
        partition, account, qos: Slurm's.
        time_min: each job's time limit in minutes.
        threads: CPUs per task.
    """

    def __init__(self, folder: Path, cluster: str = "slurm", partition: Optional[str] = None,
                 account: Optional[str] = None, qos: Optional[str] = None, time_min: int = 60,
                 threads: Optional[int] = None):
        try:
            import submitit
        except ImportError as err:
            raise UserError("launcher slurm needs submitit: pip install 'immunize[cluster]' (or pip install submitit)") from err
        self.submitit, self.folder, self.cluster = submitit, Path(folder), cluster
        self.partition, self.account, self.qos, self.time_min, self.threads = partition, account, qos, time_min, threads

    def parameters(self, cell: Cell, depends_on=None) -> dict:
        res = cell_resources(cell, self.threads)
        gpus = int(res["devices"]) if res["accelerator"] in ("gpu", "cuda") and int(res["devices"]) > 0 else 0
        params = {"name": cell.name, "timeout_min": self.time_min, "nodes": int(res["num_nodes"]),
                  "tasks_per_node": gpus if res["num_nodes"] > 1 and gpus else 1, "gpus_per_node": gpus,
                  "cpus_per_task": self.threads or 1}
        if self.cluster == "slurm":
            extra = {"partition": self.partition, "account": self.account, "qos": self.qos}
            params.update({f"slurm_{k}": v for k, v in extra.items() if v})
            if depends_on is not None:
                params["slurm_additional_parameters"] = {"dependency": f"afterok:{depends_on.job_id}"}
        return params

    def run(self, cells: list[Cell], cells_dir: Path, mode: str, on_done: Callable[[Cell, int], str]) -> dict:
        executor = self.submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        todo = _pending(cells, cells_dir)
        jobs: dict[str, object] = {}
        index = {c.name: i for i, c in enumerate(cells, start=1)}
        for cell in todo:
            parent = cell.fit_input.name if cell.fit_input is not None else None
            depends_on = jobs.get(parent)
            if depends_on is not None and self.cluster != "slurm":
                self._wait(cell.fit_input, depends_on, cells_dir)  # no dependencies outside Slurm: submit after the input
                depends_on = None
            executor.update_parameters(**self.parameters(cell, depends_on))
            jobs[cell.name] = executor.submit(execute_cell, cell, str(cells_dir), mode, self.threads)
            _say(mode, f"[cell {index[cell.name]}/{len(cells)}] submitted {cell.label} (job {jobs[cell.name].job_id})")
        for cell in todo:
            self._wait(cell, jobs[cell.name], cells_dir)
            _say(mode, f"[cell {index[cell.name]}/{len(cells)}] done {cell.label}: {on_done(cell, index[cell.name])}")
        return {"run": len(todo), "skipped": len(cells) - len(todo)}

    @staticmethod
    def _wait(cell: Cell, job, cells_dir: Path) -> None:
        try:
            job.result()
        except Exception as err:  # noqa: BLE001 - a failed job is reported in one line, with its logs named
            raise CellFailed(f"cell '{cell.label}' failed under submitit ({_gist(err)}); "
                             f"logs: {cell.directory(cells_dir) / 'log.txt'} and {job.paths.stderr}") from err


def _gist(err: Exception) -> str:
    """One line from a job's exception: its first line (what happened: "has not produced any output", "failed
    during processing") and, when there are more, its last (the job's own last word, e.g. the raised error)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0][:160]} ... {lines[-1][:160]}"


class RayLauncher:
    """Cells as Ray tasks (see the module docstring).

    Args:
        address: an existing Ray cluster's address ("auto" to find one); None starts a local Ray here.
        threads: CPUs per task.
    """

    def __init__(self, address: Optional[str] = None, threads: Optional[int] = None):
        try:
            import ray
        except ImportError as err:
            raise UserError("launcher ray needs ray: pip install 'immunize[cluster]' (or pip install ray)") from err
        self.ray, self.address, self.threads = ray, address, threads

    def run(self, cells: list[Cell], cells_dir: Path, mode: str, on_done: Callable[[Cell, int], str]) -> dict:
        ray = self.ray
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        try:
            task = ray.remote(_ray_cell)
            todo = _pending(cells, cells_dir)
            refs: dict[str, object] = {}
            index = {c.name: i for i, c in enumerate(cells, start=1)}
            for cell in todo:
                res = cell_resources(cell, self.threads)
                gpus = int(res["devices"]) if res["accelerator"] in ("gpu", "cuda") else 0
                parent = refs.get(cell.fit_input.name) if cell.fit_input is not None else None
                refs[cell.name] = task.options(num_cpus=self.threads or 1, num_gpus=gpus, name=cell.name).remote(
                    cell, str(cells_dir), mode, self.threads, parent)
            for cell in todo:
                try:
                    ray.get(refs[cell.name])
                except Exception as err:  # noqa: BLE001
                    raise CellFailed(f"cell '{cell.label}' failed under ray ({_gist(err)}); "
                                     f"log: {cell.directory(cells_dir) / 'log.txt'}") from err
                _say(mode, f"[cell {index[cell.name]}/{len(cells)}] done {cell.label}: {on_done(cell, index[cell.name])}")
            return {"run": len(todo), "skipped": len(cells) - len(todo)}
        finally:
            if started:
                ray.shutdown()


def _ray_cell(cell: Cell, cells_dir: str, mode: str, threads: Optional[int], parent=None) -> float:
    """A Ray task: `parent` (the input cell's result) only orders it after that cell."""
    return execute_cell(cell, cells_dir, mode, threads)


def _say(mode: str, line: str) -> None:
    if mode != "quiet":
        print(line, file=sys.stderr, flush=True)
