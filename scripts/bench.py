"""Throughput of every stage on this machine, measured in one run (`make bench`).

    python scripts/bench.py                          # tiny + ~25M models, CPU, a few minutes on 2 cores
    python scripts/bench.py --sizes tiny             # the embedded tiny model only (~1 min)
    python scripts/bench.py --device cuda --out bench/cuda.json

For each model size it runs the real CLI (sft, train-rm, rl with reinforce /
a2c / ppo) for a fixed amount of work in a temporary directory, the ~25M model
written with save_pretrained and passed as `model.path=` like a user's. Each
stage runs in its own process, so peak memory is per stage (RSS from getrusage;
torch.cuda.max_memory_allocated on CUDA). Per-step figures are medians over
steps (start-up and evaluation do not count). Training FLOP/s are 6 x params x
tokens/s (attention scores not counted) as a fraction of this machine's matmul
peak, measured in the same run, so figures from two runs compare as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# ~25M parameters, the embedded model's architecture (Llama, byte-level vocabulary) made wider and deeper.
MEDIUM = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8)
ALGORITHMS = ("reinforce", "a2c", "ppo")
QUIET = ["eval.every=100000", "checkpoint.every=100000", "log_every=1", "data.eval_limit=16"]


# ---------------------------------------------------------------- machine


def matmul_peak_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, trials: int = 5) -> float:
    """Best dense matmul rate (GFLOP/s) over a few sizes and short trials: the denominator of every MFU figure.

    The best of short trials, because on a shared machine a single long trial measures the neighbours too.
    """
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = 0.0
    for n in ((1024, 2048) if dev.type == "cpu" else (4096, 8192)):
        a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        repeats = max(2, int(1e10 / (2 * n ** 3))) if dev.type == "cpu" else 20  # ~0.1 s a trial on 2 cores
        for _ in range(trials):
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                a @ b
            sync()
            best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e9)
    return best


def write_model(directory: Path, seed: int = 0, **overrides) -> Path:
    """A freshly initialised model of the embedded architecture, saved as a Hugging Face dir."""
    from rlhf_cli.models.embedded import write_embedded_base

    return write_embedded_base(directory, seed, **overrides)


def n_params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(Path(model_dir) / "model.safetensors").values())


# ---------------------------------------------------------------- running the CLI


def child_main(out: str, argv: list[str]) -> None:
    """In the stage's own process: run the CLI, then record its peak memory."""
    from rlhf_cli.cli import main as cli_main

    try:
        cli_main(argv)
    finally:
        peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        Path(out).write_text(json.dumps(peak))


def cli(*args: str, cwd: Path) -> dict:
    """`rlhf ARGS` in a fresh process (the real entry point) -> its peak memory."""
    env = {**os.environ, "RLHF_NO_PROGRESS": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        peak_file = f.name
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", peak_file, "--", *args],
                              cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench: rlhf {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(peak_file).read_text())
    finally:
        os.unlink(peak_file)


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "train"]


def median_metric(run: Path, key: str, skip: int = 2) -> float | None:
    values = [r[key] for r in train_rows(run) if key in r][skip:]
    return statistics.median(values) if values else None


def median_step_s(run: Path, skip: int = 2) -> float:
    """Median wall time between consecutive logged steps (log_every=1): everything one loop iteration costs."""
    times = [r["time_s"] for r in train_rows(run)]
    gaps = [b - a for a, b in zip(times, times[1:])][max(0, skip - 1):]
    return statistics.median(gaps)


def mean_pair_tokens(model_dir: Path, n: int = 500) -> float:
    """Mean tokens of one preference pair as train-rm sees it: (prompt + chosen + EOS) + (prompt + rejected + EOS)."""
    from rlhf_cli import task
    from rlhf_cli.data import encode
    from rlhf_cli.models import load_tokenizer

    tok = load_tokenizer(str(model_dir), "model.path")
    rows = task.preference_rows(n, seed=0)
    return statistics.mean(2 * len(encode(tok, r["prompt"])) + len(encode(tok, r["chosen"]))
                           + len(encode(tok, r["rejected"])) + 2 for r in rows)


# ---------------------------------------------------------------- one model size


def bench_size(name: str, root: Path, model_dir: Path | None, work: dict, device: str, peak, log) -> dict:
    """sft -> train-rm -> rl x3 on one model; -> flat dict of figures.

    peak() measures the matmul peak right before each training stage (kept beside its figures); FLOP/s
    fractions are computed at the end against the best peak of the whole run.
    """
    root.mkdir(parents=True, exist_ok=True)
    dev = [f"device={device}"]
    model = [f"model.path={model_dir}"] if model_dir else []
    out: dict = {}
    log(f"[{name}] sft")
    out["sft_matmul_peak_gflops"] = peak()
    mem = cli("sft", "output_dir=sft", *model, *work["sft"], *QUIET, *dev, cwd=root)
    params = n_params(root / "sft" / "final")
    out["params"] = params
    out["sft_tokens_per_s"] = median_metric(root / "sft", "tokens_per_s")
    out["sft_samples_per_s"] = work["sft_batch"] / median_step_s(root / "sft")
    out["sft_train_gflops"] = 6 * params * out["sft_tokens_per_s"] / 1e9  # 6 N FLOPs per trained token
    out["sft_pad_fraction"] = median_metric(root / "sft", "pad_fraction")
    out["sft_peak_mem_mb"] = mem.get("peak_cuda_mb", mem["peak_rss_mb"])

    log(f"[{name}] train-rm")
    out["rm_matmul_peak_gflops"] = peak()
    mem = cli("train-rm", "output_dir=rm", "model.path=sft/final", *work["rm"], *QUIET, *dev, cwd=root)
    out["rm_pairs_per_s"] = median_metric(root / "rm", "pairs_per_s")
    out["rm_tokens_per_s"] = out["rm_pairs_per_s"] * mean_pair_tokens(root / "sft" / "final")
    out["rm_train_gflops"] = 6 * params * out["rm_tokens_per_s"] / 1e9
    out["rm_peak_mem_mb"] = mem.get("peak_cuda_mb", mem["peak_rss_mb"])

    for algorithm in ALGORITHMS:
        log(f"[{name}] rl {algorithm}")
        run = root / f"rl-{algorithm}"
        mem = cli("rl", f"output_dir={run.name}", f"algorithm={algorithm}", "policy.path=sft/final",
                  *work["rl"], *QUIET, *dev, cwd=root)
        p = f"rl_{algorithm}"
        for key in ("samples_per_s", "tokens_per_s", "time_rollout_frac", "time_score_frac", "time_update_frac",
                    "response_len"):
            out[f"{p}_{key}"] = median_metric(run, key, skip=1)
        # response tokens per second of rollout time (tokens up to and including EOS)
        out[f"{p}_gen_tokens_per_s"] = out[f"{p}_tokens_per_s"] / out[f"{p}_time_rollout_frac"]
        out[f"{p}_peak_mem_mb"] = mem.get("peak_cuda_mb", mem["peak_rss_mb"])
    return out


def work_for(size: str, steps: int) -> dict:
    """The fixed amount of work per stage: the default batches for tiny, small ones for ~25M."""
    if size == "tiny":
        return {"sft": [f"max_steps={steps}"], "sft_batch": 64, "rm": [f"max_steps={steps}"],
                "rl": [f"max_steps={max(4, steps // 3)}"]}
    return {"sft": [f"max_steps={steps}", "batch_size=16", "optim.lr=3e-4"], "sft_batch": 16,
            "rm": [f"max_steps={steps}", "batch_size=8", "optim.lr=3e-4"],
            "rl": [f"max_steps={max(3, steps // 2)}", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
                   "optim.lr=1e-5"]}


# ---------------------------------------------------------------- report


ROWS = [  # (label, key, format)
    ("parameters", "params", "{:,.0f}"),
    ("sft tokens/s", "sft_tokens_per_s", "{:,.0f}"),
    ("sft samples/s", "sft_samples_per_s", "{:,.1f}"),
    ("sft training GFLOP/s (6 N per token)", "sft_train_gflops", "{:,.1f}"),
    ("sft FLOP/s / best matmul peak", "sft_mfu", "{:.1%}"),
    ("  matmul peak just before (GFLOP/s)", "sft_matmul_peak_gflops", "{:,.0f}"),
    ("sft pad fraction", "sft_pad_fraction", "{:.1%}"),
    ("sft peak memory (MB)", "sft_peak_mem_mb", "{:,.0f}"),
    ("train-rm pairs/s", "rm_pairs_per_s", "{:,.1f}"),
    ("train-rm tokens/s", "rm_tokens_per_s", "{:,.0f}"),
    ("train-rm training GFLOP/s", "rm_train_gflops", "{:,.1f}"),
    ("train-rm FLOP/s / best matmul peak", "rm_mfu", "{:.1%}"),
    ("  matmul peak just before (GFLOP/s)", "rm_matmul_peak_gflops", "{:,.0f}"),
    ("train-rm peak memory (MB)", "rm_peak_mem_mb", "{:,.0f}"),
] + [row for a in ALGORITHMS for row in (
    (f"rl {a} samples/s", f"rl_{a}_samples_per_s", "{:,.1f}"),
    (f"rl {a} response tokens/s", f"rl_{a}_tokens_per_s", "{:,.0f}"),
    (f"rl {a} generation tokens/s", f"rl_{a}_gen_tokens_per_s", "{:,.0f}"),
    (f"rl {a} time: generation / scoring / update", f"rl_{a}_time", None),
    (f"rl {a} mean response tokens", f"rl_{a}_response_len", "{:.1f}"),
    (f"rl {a} peak memory (MB)", f"rl_{a}_peak_mem_mb", "{:,.0f}"),
)]


def fmt(figures: dict, key: str, spec: str | None) -> str:
    if spec is None:  # the RL time split
        a = key[:-len("_time")]
        return " / ".join(f"{figures.get(f'{a}_{k}_frac', float('nan')):.0%}" for k in ("time_rollout", "time_score",
                                                                                          "time_update"))
    value = figures.get(key)
    return "-" if value is None else spec.format(value)


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    table = Table(title=f"rlhf bench: {m['device']}, {m['torch_threads']} threads, {m['peak_dtype']} matmul peak "
                        f"{m['matmul_peak_gflops']:,.0f} GFLOP/s (best of the run), load {m['load_average_1m']:.1f} "
                        f"-> {m['load_average_1m_after']:.1f}")
    table.add_column("figure")
    sizes = list(results["sizes"])
    for s in sizes:
        table.add_column(s, justify="right")
    for label, key, spec in ROWS:
        table.add_row(label, *[fmt(results["sizes"][s], key, spec) for s in sizes])
    Console(width=max(110, Console().width)).print(table)


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--child":  # the stage's own process (see cli())
        return child_main(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/latest.json", help="JSON file of the figures")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (passed as device=... to every stage)")
    parser.add_argument("--sizes", default="tiny,25m", help="comma-separated: tiny, 25m")
    parser.add_argument("--steps", type=int, default=20, help="sft / train-rm steps on the tiny model (rl: a third)")
    parser.add_argument("--steps-25m", type=int, default=5, help="sft / train-rm steps on the ~25M model (rl: half)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every stage (OMP_NUM_THREADS); default: torch's default")
    args = parser.parse_args()
    if args.threads:  # every stage's process inherits it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if unknown := set(sizes) - {"tiny", "25m"}:
        sys.exit(f"bench: unknown size(s) {sorted(unknown)}; use tiny and/or 25m")
    cuda = args.device.startswith("cuda")
    peak_dtype = torch.bfloat16 if cuda else torch.float32  # conf/device/cuda.yaml trains under bf16 autocast
    t_start = time.time()
    results: dict = {"machine": {
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0], "peak_dtype": str(peak_dtype).replace("torch.", "")}, "sizes": {}}
    peaks: list[float] = []

    def peak() -> float:
        peaks.append(matmul_peak_gflops(args.device, peak_dtype))
        return peaks[-1]

    log = lambda msg: print(f"bench {time.time() - t_start:6.0f}s {msg}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in sizes:
            model_dir = write_model(root / "models" / "25m", **MEDIUM) if size == "25m" else None
            steps = args.steps if size == "tiny" else args.steps_25m
            results["sizes"][size] = bench_size(size, root / size, model_dir, work_for(size, steps), args.device,
                                                peak, log)
    peak()  # once more after the last stage
    results["machine"]["matmul_peak_gflops"] = best_peak = max(peaks)
    for figures in results["sizes"].values():
        for stage in ("sft", "rm"):
            figures[f"{stage}_mfu"] = figures[f"{stage}_train_gflops"] / best_peak
    results["machine"]["matmul_peaks_gflops"] = [round(p, 1) for p in peaks]  # the spread shows the contention
    results["machine"]["load_average_1m_after"] = os.getloadavg()[0]
    results["machine"]["wall_s"] = round(time.time() - t_start, 1)
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out} ({results['machine']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
