"""Run `immunize ARGV` as separate processes, fast: one server process imports immunize (torch, Lightning,
transformers) once, then forks a child per call. Each child changes to its folder, takes its environment, writes
its stdout and stderr to files of its own and exits with the command's code, as `python -m immunize ARGV` would, in
a fraction of a second instead of ten. The bad-input tests run dozens of commands through it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SERVER = r'''
import json, os, sys, time, traceback
import immunize.main, immunize.cli, immunize.bench.command, immunize.judges.command, immunize.gguf_import
import jsonargparse, transformers, lightning_modules, datamodules, callbacks  # what the commands import lazily
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(req["cwd"])
            os.environ.clear()
            os.environ.update(req["env"])
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.argv = ["immunize", *req["argv"]]
            try:
                immunize.main.main(req["argv"])
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            rc = -9
            break
        time.sleep(0.02)
    print(json.dumps({"rc": rc}), flush=True)
'''


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class CliServer:
    """A warm process that runs `immunize ARGV` in forked children.

    Args:
        repo: the checkout whose immunize is imported (PYTHONPATH).
        env: extra environment of the server and its children.
    """

    def __init__(self, repo: Path, env: Optional[dict] = None):
        self.outputs = Path(tempfile.mkdtemp(prefix="immunize-cli-"))
        self.env = {**os.environ, "PYTHONPATH": str(repo), **(env or {})}
        self.env.pop("PYTHONWARNINGS", None)  # the children see warnings as a user's shell would
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=self.env, text=True, cwd=str(repo))
        ready = self.proc.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the CLI server did not start (said {ready!r})")

    def run(self, *argv: str, cwd: Path, env: Optional[dict] = None, timeout: int = 300) -> Result:
        out, err = self.outputs / "stdout", self.outputs / "stderr"  # outside cwd: a command may not see them
        request = {"argv": list(argv), "cwd": str(cwd), "env": {**self.env, **(env or {})}, "stdout": str(out),
                   "stderr": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        result = Result(reply["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))
        out.unlink()
        err.unlink()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        shutil.rmtree(self.outputs, ignore_errors=True)
