"""`python -m rlhf_cli ARGS` as processes forked from a server that imported torch, transformers and the
stages once (multiprocessing's forkserver): what `run_cli` (conftest.py) and the bad-input table launch.

Each launch is a real process: its own pid, exit code, stdout and stderr (files at fd 1 and 2), working
directory, environment and resource limits; it runs `rlhf_cli/__main__.py` through runpy as `python -m
rlhf_cli` does, with the sys.path a fresh `python -m` would have there (the working directory, then
PYTHONPATH's entries, then the interpreter's own; never the test process's additions), and an exception
nobody catches prints its traceback and exits 1, as the interpreter would; the interpreter's exit functions
run at the end. What it skips is ~3 CPU seconds of imports per launch (about 200 launches a test session).
The server is a fresh interpreter that imported only PRELOAD, never the test process forked, so no test's
state leaks in; it starts as the CLI starts (OpenMP waits passively unless the environment says otherwise,
set before torch loads). Modules read their environment variables when they run (RANK, WORLD_SIZE,
RLHF_NO_PROGRESS, ...); only OpenMP's, read once when torch loads, are the server's (OMP_NUM_THREADS=1 under
xdist, conftest.py). Tests of signals, kill -9, torchrun and start-up itself launch `python -m rlhf_cli` as
a plain subprocess.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["forked_cli", "torch", "transformers", "rlhf_cli.cli", "rlhf_cli.stages.sft", "rlhf_cli.stages.train_rm",
           "rlhf_cli.stages.rl", "rlhf_cli.stages.dpo", "rlhf_cli.commands.evaluate", "rlhf_cli.commands.generate",
           "rlhf_cli.commands.label"]
_CONTEXT = None


def _fresh_sys_path() -> list[str]:
    """sys.path of a fresh interpreter without PYTHONPATH, less its first entry (the script dir / cwd)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)


def _context():
    """The forkserver context, its server started with the environment the CLI gives torch: OpenMP waits
    passively unless the environment says otherwise (rlhf_cli.cli.main sets it before torch loads)."""
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
        chose = "OMP_WAIT_POLICY" in os.environ
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            forkserver.ensure_running()  # the server copies this process's environment now
        finally:
            if not chose:
                del os.environ["OMP_WAIT_POLICY"]
    return _CONTEXT


def _child(argv: list[str], cwd: str, env: dict, out: str, err: str, fsize: int | None, base_path: list[str]) -> None:
    import atexit
    import runpy

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    extra = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.getcwd(), *extra, *base_path]  # what `python -m` in cwd would start with
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # Python ignores SIGXFSZ: writes get EFBIG
    sys.argv = ["rlhf_cli", *argv]
    try:
        runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (the forked child leaves through os._exit)


_BASE_PATH: list[str] | None = None
# variables a test may set that the CLI reads while it runs (forking keeps them exact); any other variable a
# test sets may act at interpreter start-up or import time (RLHF_CONF_DIR, OMP_*, PYTHON*): a plain process
RUNTIME_VARIABLES = {"PYTHONPATH", "RLHF_NO_PROGRESS", "PYTHONUNBUFFERED"}
STARTUP_FILES = ("sitecustomize.py", "usercustomize.py")


def forkable(env_changes: dict) -> bool:
    """Whether a launch with these environment changes (on top of the test process's) behaves as a fresh
    `python -m rlhf_cli`: only RUNTIME_VARIABLES, and no PYTHONPATH entry holding a module or .pth file that
    the interpreter runs at start-up."""
    if set(env_changes) - RUNTIME_VARIABLES:
        return False
    for entry in env_changes.get("PYTHONPATH", "").split(os.pathsep):
        d = Path(entry) if entry else None
        if d is not None and d.is_dir() and (any((d / f).exists() for f in STARTUP_FILES) or any(d.glob("*.pth"))):
            return False
    return True


class Launch:
    """One forked `python -m rlhf_cli ARGV` in cwd; poll() like Popen's, result() -> CompletedProcess.
    Its stdout and stderr go to files in io_dir (a new temporary directory by default), never into cwd."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, rlimit_fsize: int | None = None,
                 io_dir: Path | None = None):
        global _BASE_PATH
        if _BASE_PATH is None:
            _BASE_PATH = _fresh_sys_path()
        io_dir = Path(io_dir or tempfile.mkdtemp(prefix="forked-cli-"))
        self.argv, self.out, self.err = argv, io_dir / "stdout", io_dir / "stderr"
        self.process = _context().Process(target=_child, args=(argv, str(cwd), env, str(self.out), str(self.err),
                                                                rlimit_fsize, _BASE_PATH))
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(["rlhf", *self.argv], timeout, self.out.read_text(), self.err.read_text())
        return subprocess.CompletedProcess(["rlhf", *self.argv], self.process.exitcode, self.out.read_text(),
                                           self.err.read_text())
