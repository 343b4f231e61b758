"""`python -m rlhf_cli ARGS` as processes forked from a server that imported torch, transformers and the
stages once (multiprocessing's forkserver), for tests that launch the CLI dozens of times.

Each launch is a real process: its own exit code, its own stdout and stderr (files at fd 1 and 2), its own
working directory, environment and resource limits, and it runs `rlhf_cli/__main__.py` exactly as
`python -m rlhf_cli` does (runpy); an exception nobody catches prints its traceback and exits 1, as the
interpreter would. What it skips is ~3 CPU seconds of imports per launch: the server is a fresh Python that
imported only PRELOAD (never the test process forked, so no test's state leaks in). Modules that read the
environment at import time read the server's; rlhf_cli reads its variables (RANK, WORLD_SIZE,
RLHF_NO_PROGRESS, ...) when it runs.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "transformers", "rlhf_cli.cli", "rlhf_cli.stages.sft", "rlhf_cli.stages.train_rm",
           "rlhf_cli.stages.rl", "forked_cli"]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _child(argv: list[str], cwd: str, env: dict, out: str, err: str, fsize: int | None) -> None:
    import atexit
    import runpy

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if fsize is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))  # Python ignores SIGXFSZ: writes get EFBIG
    sys.argv = ["rlhf_cli", *argv]
    try:
        runpy.run_module("rlhf_cli", run_name="__main__", alter_sys=True)
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (the forked child leaves through os._exit)


class Launch:
    """One forked `python -m rlhf_cli ARGV` in cwd; poll() like Popen's, result() -> CompletedProcess.
    Its stdout and stderr go to files in io_dir (a new temporary directory by default), never into cwd."""

    def __init__(self, argv: list[str], cwd: Path, env: dict, rlimit_fsize: int | None = None,
                 io_dir: Path | None = None):
        io_dir = Path(io_dir or tempfile.mkdtemp(prefix="forked-cli-"))
        self.argv, self.out, self.err = argv, io_dir / "stdout", io_dir / "stderr"
        self.process = _context().Process(target=_child, args=(argv, str(cwd), env, str(self.out), str(self.err),
                                                                rlimit_fsize))
        self.process.start()

    def poll(self) -> int | None:
        return self.process.exitcode

    def result(self) -> subprocess.CompletedProcess:
        self.process.join()
        return subprocess.CompletedProcess(["rlhf", *self.argv], self.process.exitcode, self.out.read_text(),
                                           self.err.read_text())
