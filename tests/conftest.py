"""Shared fixtures: tiny real models saved as Hugging Face dirs, and the real CLI as a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forked_cli import Launch, forkable

REPO = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on a 2-core box: one thread per process (inherited by every
    # subprocess), or OpenMP oversubscription makes each run 4-10x slower
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m rlhf_cli ARGS` in cwd, its own process; output captured as text. Forked from a server that
    imported torch and the stages once (tests/forked_cli.py: the same entry point, sys.path and environment,
    ~3 CPU seconds of imports fewer a launch), unless the test's environment acts at start-up: then a plain
    `python -m rlhf_cli` subprocess."""
    full_env = {**os.environ, "RLHF_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if not forkable(env or {}):  # the environment acts at start-up (a sitecustomize, RLHF_CONF_DIR, OMP_*)
        return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=full_env)
    return Launch(list(args), cwd=cwd, env=full_env).result(timeout)


def run_cli_together(commands: dict[str, list[str]], cwd: Path,
                     timeout: int = 300) -> dict[str, subprocess.CompletedProcess]:
    """{name: ARGS} -> {name: the result of `python -m rlhf_cli ARGS`}, all launched at once as run_cli launches
    them (forked: each its own process, without the ~3 CPU seconds of imports), for tables of inputs that each
    stop early."""
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1"}
    launches = {name: Launch(list(args), cwd=cwd, env=env) for name, args in commands.items()}
    return {name: launch.result(timeout) for name, launch in launches.items()}


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit 2, no traceback, and an `error:` line naming the problem."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, out
    assert fragment.lower() in out.lower().replace("\n", " "), out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded tiny Llama + byte tokenizer, saved and loaded like any HF model."""
    from rlhf_cli.models.embedded import write_embedded_base

    return write_embedded_base(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """`rlhf sft` on the embedded task at 600 steps (about 40 s), the SFT checkpoint the RL tests start from.

    600, not the default 1500: the embedded task has converged by then (eval loss 0.039 at 600 and
    0.034 at 1500, greedy accuracy 28-32% at either), and 1500 would add a minute to every test session.

    Made once per test session: under xdist the workers share it (the first one to take the
    lock trains it, the others wait and read it; tests only read it)."""
    return shared_run(tmp_path_factory, "sft_default", "max_steps=600")


def shared_run(tmp_path_factory, name: str, *args: str, setup=None) -> Path:
    """`rlhf sft ARGS` made once per test session in a directory the xdist workers share (the first to take the
    lock trains it, the others wait and read it); setup(root), when given, first writes what the run reads."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(exist_ok=True)
    run = root / "run"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "final" / "manifest.json").exists():
            if setup is not None:
                setup(root)
            proc = run_cli("sft", f"output_dir={run}", *args, cwd=root)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    return run


@pytest.fixture(scope="session")
def modsteps_sft(tmp_path_factory) -> Path:
    """`rlhf sft` on the modsteps environment's turns (rlhf_cli/envs/modsteps.py, one row per assistant turn) at
    400 steps (eval loss 0.11 against 0.10 at 1500: the demonstrator's slips are the floor); its files beside
    it in data/ (prompts_train / prompts_eval for RL)."""
    def write_files(root: Path) -> None:
        from rlhf_cli.envs import modsteps
        from rlhf_cli.envs.base import write

        write(modsteps.TASK, root / "data")

    run = shared_run(tmp_path_factory, "sft_modsteps", "max_steps=400", "data.train=data/sft_train.jsonl",
                     "data.eval=data/sft_eval.jsonl", "eval.rule=null", setup=write_files)
    return run
