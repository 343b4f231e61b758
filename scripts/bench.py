"""Throughput of every stage on this machine, measured in one run (`make bench`).

    python scripts/bench.py                    # embedded tiny model, CPU
    python scripts/bench.py --out bench/cpu.json

Runs the real CLI for a fixed amount of work per stage in a temporary
directory and reads the per-step figures the runners log (median over steps,
so start-up and evaluation do not count), plus this machine's fp32 matmul peak
measured in the same run, so figures are ratios you can compare across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9


def cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "RLHF_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench: rlhf {' '.join(args)} failed:\n{proc.stderr[-2000:]}")


def median_metric(run: Path, key: str, skip: int = 2) -> float | None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if r.get("kind") == "train" and key in r][skip:]
    return statistics.median(values) if values else None


def n_params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/latest.json")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    console = Console()
    results: dict = {"torch_threads": torch.get_num_threads(), "device": "cpu"}
    results["matmul_peak_gflops"] = matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        steps = str(args.steps)
        common = ["eval.every=100000", "log_every=1", "checkpoint.every=100000"]
        cli("sft", "output_dir=sft", f"max_steps={steps}", *common, cwd=root)
        results["sft_tokens_per_s"] = median_metric(root / "sft", "tokens_per_s")
        params = n_params(root / "sft" / "final")
        results["params"] = params
        results["sft_train_gflops"] = 6 * params * results["sft_tokens_per_s"] / 1e9  # 6N FLOPs per trained token
        results["sft_mfu"] = results["sft_train_gflops"] / results["matmul_peak_gflops"]
        cli("train-rm", "output_dir=rm", "model.path=sft/final", f"max_steps={steps}", *common, cwd=root)
        results["rm_pairs_per_s"] = median_metric(root / "rm", "pairs_per_s")
        results["rm_tokens_per_s"] = median_metric(root / "rm", "tokens_per_s")
        for algorithm in ("reinforce", "a2c", "ppo"):
            run = root / f"rl-{algorithm}"
            cli("rl", f"output_dir={run.name}", f"algorithm={algorithm}", "policy.path=sft/final",
                f"max_steps={max(6, args.steps // 3)}", *common, cwd=root)
            for key in ("samples_per_s", "tokens_per_s", "time_rollout_frac", "time_score_frac", "time_update_frac"):
                results[f"rl_{algorithm}_{key}"] = median_metric(run / "", key, skip=1)
    table = Table(title=f"rlhf bench (tiny model, {results['params']:,} params, {results['torch_threads']} threads)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in results.items():
        table.add_row(k, f"{v:,.3f}" if isinstance(v, float) else str(v))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
