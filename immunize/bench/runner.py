"""Run cells as `python -m immunize fit|test --config <cell>/cell.yaml` subprocesses (a judge cell as
`immunize judges`, immunize.bench.judging), resumably.

A cell is done when its marker exists (model/stage.json for fits, metrics.json for tests, judged/agreement.json
for judge cells); each is written atomically by the command, so a cell killed at any moment is simply not done. A cell
that is not done is run from scratch in a fresh directory (whatever a killed run left is removed first),
so no state leaks between attempts or between cells. Subprocesses die with the bench (PR_SET_PDEATHSIG
on Linux), so `kill -9` of the bench leaves no orphan writing into a cell directory.
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from immunize.bench.cells import MODEL_KEY, Cell, read_json, resolve_cell_refs
from immunize.bench.judging import KEPT as JUDGE_SCORES, KIND as JUDGE, judge_argv, record_input, refresh
from immunize.bench.progress import Eta, Printer
from immunize.bench.recorder import PREFIX
from immunize.bench.stages import REPO_ROOT, set_dotted, to_yaml
from immunize.errors import UserError
from immunize.io import atomic_write_json, atomic_write_text

RECORDER = "immunize.bench.recorder.CellRecorder"
CELL_CONFIG = "cell.yaml"  # what the bench generated (LightningCLI may write its own config.yaml next to it)


class CellFailed(Exception):
    """A cell's subprocess failed; code 2 when it reported bad input (exit 2), else 1."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def runtime_config(cell: Cell, cells_dir: Path, progress_bar: bool, updates: int) -> dict:
    """The cell's config plus what only concerns running it: input model, outputs, logger, recorder.

    With progress bars shown, Lightning's info lines and the test metrics table are turned off (the bench
    prints its own summary); the log keeps them otherwise."""
    cfg = copy.deepcopy(cell.config)
    d = cell.directory(cells_dir).resolve()
    set_dotted(cfg, MODEL_KEY, cell.input_path(cells_dir.resolve()) if isinstance(cell.input, Cell) else cell.input)
    resolve_cell_refs(cfg, cells_dir.resolve())
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(d)
    trainer["enable_progress_bar"] = progress_bar
    trainer["enable_model_summary"] = False
    if cell.kind == "fit":
        cfg["export_dir"] = str(d / "model")
        cfg["skip_if_cached"] = False
        trainer["enable_checkpointing"] = False
        trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(d), "name": "", "version": "csv"}}
        callbacks = trainer.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        callbacks.append({"class_path": RECORDER, "init_args": {"out_file": str(d / "train.json"), "updates": updates,
                                                                "quiet": progress_bar}})
        trainer["callbacks"] = callbacks
    else:
        trainer["logger"] = False
        if progress_bar:
            cfg["verbose"] = False
            callbacks = trainer.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            trainer["callbacks"] = callbacks + [{"class_path": RECORDER, "init_args": {"updates": 0, "quiet": True}}]
    return cfg


def child_env(threads: Optional[int], quiet_warnings: bool = False) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight loading/saving bars
    if quiet_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


class _LineFilter:
    """Forward only the recorder's progress lines of a child's output (the bench reports failures itself)."""

    def __init__(self, stream):
        self.stream, self.buffer = stream, b""

    def __call__(self, chunk: bytes) -> None:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").split("\r")[-1].rstrip()
            if line.startswith(PREFIX):
                self.stream.write(line + "\n")
                self.stream.flush()


def _raw_forward(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def _output_channel(mode: str) -> tuple[int, int, bool]:
    """(read end, write end, is a pty) for a child's stdout+stderr: a pseudo-terminal in bars mode on a terminal
    (Lightning draws its progress bars), else a pipe."""
    if mode == "bars" and sys.stdout.isatty() and sys.platform != "win32":
        import pty

        master, slave = pty.openpty()
        try:
            import fcntl
            import struct
            import termios

            cols, rows = shutil.get_terminal_size()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except Exception:
            pass
        return master, slave, True
    read, write = os.pipe()
    return read, write, False


def _pump(fd: int, log_path: Path, mode: str) -> None:
    """Copy a child's output to log_path, forwarding it per mode, until the child closes it."""
    forward: Callable[[bytes], None] = {"bars": _raw_forward, "lines": _LineFilter(sys.stderr)}.get(mode, lambda c: None)
    with open(log_path, "wb") as log:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side closed
                break
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            forward(chunk)


def _run_child_command(argv: list[str], env: dict, threads: Optional[int], write_fd: int) -> None:
    """In a forked child: become `immunize ARGV` with output on write_fd, then exit with its code (never returns)."""
    code = 1
    try:
        _die_with_parent()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.environ.clear()
        os.environ.update(env)
        if env.get("PYTHONWARNINGS") == "ignore":
            import warnings

            warnings.simplefilter("ignore")
        if threads:
            import torch

            torch.set_num_threads(threads)
        judges = argv[0] == "judges"
        if judges:
            from immunize.judges.command import main
        else:
            from immunize.cli import main

        try:
            code = (main(argv[1:]) if judges else main(argv)) or 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit like an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_cell_process(argv: list[str], env: dict, log_path: Path, mode: str, threads: Optional[int] = None) -> int:
    """Run `immunize ARGV` as a child process with its output teed to log_path and forwarded per mode; returns
    its exit code. bars: all output (on a pseudo-terminal); lines: only the recorder's step lines; quiet: nothing.

    On POSIX the child is forked from this process, which has already imported torch, Lightning and the
    project, so a cell starts in well under a second instead of re-importing them (about 10 s on a small
    CPU); elsewhere it is a fresh `python -m immunize`. Either way it dies with the bench (PR_SET_PDEATHSIG).
    """
    read_fd, write_fd, is_pty = _output_channel(mode)
    sys.stdout.flush()
    sys.stderr.flush()
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _run_child_command(argv, env, threads, write_fd)
        os.close(write_fd)
        wait = lambda timeout=None: _wait_pid(pid, timeout)  # noqa: E731
        kill = lambda: os.kill(pid, signal.SIGKILL)  # noqa: E731
    else:
        proc = subprocess.Popen([sys.executable, "-m", "immunize", *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=write_fd, stderr=write_fd)
        os.close(write_fd)
        wait, kill = proc.wait, proc.kill
    try:
        _pump(read_fd, log_path, mode)
        return wait()
    except BaseException:  # Ctrl-C: the child got SIGINT too; give it a moment to stop, then kill it
        try:
            wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill()
            wait()
        raise
    finally:
        os.close(read_fd)


def _wait_pid(pid: int, timeout: Optional[float] = None) -> int:
    """Exit code of a forked child (negative signal number if killed); TimeoutExpired after `timeout` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(str(pid), timeout)
        time.sleep(0.1)


def failure_message(log_path: Path) -> tuple[str, bool]:
    """(the most telling line of a failed cell's log, whether it was a user error)."""
    try:
        lines = [l.split("\r")[-1].strip() for l in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output", False
    lines = [l for l in lines if l]
    for line in reversed(lines):
        if line.startswith("immunize: error:"):
            return line[len("immunize: error:"):].strip(), True
    for line in reversed(lines):
        if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
            return line, False
    return (lines[-1] if lines else "no output"), False


class Runner:
    """Runs a plan's cells in order, skipping finished ones; calls on_done(cell) after each finished cell."""

    def __init__(self, cells_dir: Path, mode: str, threads: Optional[int], quiet: bool = False):
        self.cells_dir = Path(cells_dir)
        self.mode, self.threads = mode, threads
        self.quiet = quiet

    def run(self, cells: list[Cell], on_done: Callable[[Cell, int], str] = lambda cell, i: "") -> dict:
        printer = Printer(len(cells), quiet=self.quiet)
        eta = Eta()
        pending = []
        for cell in cells:
            if cell.is_done(self.cells_dir):
                eta.observe(cell, (read_json(cell.directory(self.cells_dir) / "run.json") or {}).get("wall_time_s"))
            else:
                pending.append(cell)
        counts = {"run": 0, "skipped": 0}
        for index, cell in enumerate(cells, start=1):
            d = cell.directory(self.cells_dir)
            refresh([cell], self.cells_dir)  # a judge cell whose eval cell just ran again is stale
            if cell.is_done(self.cells_dir):
                printer.cached(index, cell, _shown(d))
                counts["skipped"] += 1
                on_done(cell, index)
                continue
            todo = pending[pending.index(cell):]
            printer.start(index, cell, eta.remaining(todo))
            seconds = self.run_cell(cell)
            eta.observe(cell, seconds)
            counts["run"] += 1
            printer.finished(index, cell, seconds, on_done(cell, index))
        return counts

    def run_cell(self, cell: Cell) -> float:
        d = cell.directory(self.cells_dir)
        kept = None
        if d.exists():
            keep_fallbacks(d, self.cells_dir)
            kept = keep_judge_scores(cell, d)
            shutil.rmtree(d)  # leftovers of a killed or failed attempt (its fallback exports were moved out)
        d.mkdir(parents=True)
        if kept is not None:  # a judge's per-answer cache (keyed by its spec): the rerun scores only what is missing
            (d / JUDGE_SCORES).parent.mkdir(parents=True)
            os.replace(kept, d / JUDGE_SCORES)
            kept.parent.rmdir()
        bars = self.mode == "bars"
        if cell.kind == JUDGE:  # `immunize judges` on the eval cell's generations; cell.yaml records the judge
            atomic_write_text(d / CELL_CONFIG, f"# {cell.label}\n" + to_yaml(cell.config))
            argv = judge_argv(cell, self.cells_dir)
        else:
            cfg = runtime_config(cell, self.cells_dir, progress_bar=bars,
                                 updates=0 if bars or self.mode == "quiet" else 4)
            atomic_write_text(d / CELL_CONFIG, f"# {cell.label}\n" + to_yaml(cfg))
            argv = [cell.kind, "--config", str((d / CELL_CONFIG).resolve())]
        start = time.monotonic()
        rc = run_cell_process(argv, child_env(self.threads, quiet_warnings=bars), d / "log.txt", self.mode, self.threads)
        seconds = time.monotonic() - start
        if rc != 0 or not cell.is_done(self.cells_dir):
            message, user_error = failure_message(d / "log.txt")
            why = f"exit code {rc}" if rc != 0 else "it ended without its completion marker"
            raise CellFailed(f"cell '{cell.label}' failed ({why}): {message} (log: {_shown(d / 'log.txt')})",
                             code=2 if (user_error or rc == 2) else 1)
        if cell.kind == JUDGE:
            record_input(cell, self.cells_dir)
        atomic_write_json(d / "run.json", {"wall_time_s": round(seconds, 1), "command": ["-m", "immunize", *argv]})
        return seconds


def keep_judge_scores(cell: Cell, cell_dir: Path) -> Optional[Path]:
    """Move a judge cell's score cache out of its folder before the folder is cleared (None: nothing to keep)."""
    cache = cell_dir / JUDGE_SCORES
    if cell.kind != JUDGE or not cache.is_dir():
        return None
    import tempfile

    holder = Path(tempfile.mkdtemp(prefix=".kept-", dir=cell_dir.parent))
    os.replace(cache, holder / "scores")
    return holder / "scores"


KEPT_DIR = "kept"  # cells_dir/kept/<cell>/<fallback>: trained models whose export failed, never deleted by the bench


def keep_fallbacks(cell_dir: Path, cells_dir: Path) -> list[Path]:
    """Move the fallback exports a failed attempt left in a cell folder (immunize.cli.export_or_keep) to
    cells_dir/kept/<cell>/ before the folder is cleared for a rerun; returns their new paths and says so."""
    from immunize.cli import FALLBACK_PREFIX

    moved = []
    for folder in sorted(Path(cell_dir).glob(f"{FALLBACK_PREFIX}-*")):
        if not folder.is_dir():
            continue
        target = Path(cells_dir) / KEPT_DIR / Path(cell_dir).name / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, target)
        moved.append(target)
        print(f"immunize bench: kept the trained model of an earlier failed export of {Path(cell_dir).name} in "
              f"{_shown(target)}", file=sys.stderr)
    return moved


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def lock(directory: Path):
    """An exclusive lock on directory/.lock for this process's lifetime (released by the OS on any exit)."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / ".lock", "w")
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # not POSIX: no lock
        return handle
    except OSError:
        raise UserError(f"another `immunize bench` is running on {directory}; wait for it or use another --out/cells_dir")
    return handle
