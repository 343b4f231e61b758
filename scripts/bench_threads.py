"""Thread settings quiet and under load (issue 15): wall time of one tiny `rlhf sft` per setting.

    python scripts/bench_threads.py                  # ~6 minutes on 2 cores
    python scripts/bench_threads.py --steps 40 --out bench/threads.json

Settings (the rest of the command identical):

    torch default    OpenMP as torch leaves it (one thread per core, libgomp's spin-then-sleep waiting);
                     torch is imported before rlhf_cli can set anything
    passive          OMP_WAIT_POLICY=PASSIVE, one thread per core (what `rlhf` sets when the variable is unset)
    1 thread         device.threads=1

Each runs alone ("quiet": whatever else the machine runs, its load average is recorded) and while one
other job runs (a 1-thread `rlhf sft` started just before, stopped just after: the shared machine of a
sweep or a colleague's job).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "torch default": ({}, [], True),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, [], False),
    "1 thread": ({}, ["device.threads=1"], False),
}


def sft_command(out: Path, steps: int, extra: list[str], torch_first: bool) -> list[str]:
    args = ["sft", f"output_dir={out}", f"max_steps={steps}", "eval.every=100000", "checkpoint.every=100000",
            "data.num_eval=8", "device=cpu", *extra]
    if torch_first:  # libgomp reads its environment when torch loads it: before rlhf_cli runs
        return [sys.executable, "-c", "import sys, torch; from rlhf_cli.cli import main; main(sys.argv[1:])", *args]
    return [sys.executable, "-m", "rlhf_cli", *args]


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench-threads: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="bench/threads.json")
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for load in (False, True):
            for name, (env, extra, torch_first) in SETTINGS.items():
                background = None
                if load:  # the other job: runs longer than the measured one, then stopped
                    background = subprocess.Popen(
                        sft_command(root / f"load-{name}", args.steps * 20, ["device.threads=1"], False),
                        env=base_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(5)  # past its start-up
                loadavg = os.getloadavg()[0]
                seconds = timed(sft_command(root / f"run-{name}-{load}", args.steps, extra, torch_first),
                                {**base_env, **env})
                if background is not None:
                    background.kill()
                    background.wait()
                results.append({"setting": name, "load": load, "seconds": seconds, "loadavg_1m": loadavg})
                print(f"{name:14} {'one other job' if load else 'alone':14} {seconds:6.1f} s  (load avg {loadavg:.1f})",
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "cores": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
