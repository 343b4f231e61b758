"""Rollout engines on one model shape: generation tokens/s and RL samples/s of lean, hf and vllm (docs/engines.md).

    make install-vllm                                                   # .venv-vllm (CUDA build where nvidia-smi is)
    .venv-vllm/bin/python scripts/bench_engines.py --device cuda --shape qwen0.5b --max-new-tokens 1024
    .venv-vllm/bin/python scripts/bench_engines.py --device cuda --shape qwen1.5b --max-new-tokens 512 --trl
    .venv-vllm/bin/python scripts/bench_engines.py --shape tiny32 --max-new-tokens 32 --steps 3   # CPU smoke test

The model is random (built from a config, the embedded byte tokenizer, the real vocabulary size), so
responses almost always run to --max-new-tokens (an id among 151,936 is rarely the stop id).
Generation: one call of --prompts prompts x --k samples through the engine the RL stage would
build, after one warm-up call; tokens/s counts response tokens. RL: `rlhf rl` with each engine for
--steps steps (reinforce with the group_norm baseline, as GRPO), samples/s the median over the
steps after the first. --trl adds TRL's GRPOTrainer with vLLM colocated (use_vllm=True, vllm_mode="colocate") on the same model, prompts,
K, length and batch (needs `pip install trl` in the venv). Each measurement runs in its own process.
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

# Qwen2.5-0.5B / 1.5B shapes (random weights); tiny32: the embedded model with 32-wide heads (vLLM's CPU kernels)
SHAPES = {
    "qwen0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                     num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny32": dict(model_type="llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=2, vocab_size=264, tie_word_embeddings=True),
}


def write_model(directory: Path, shape: str, dtype: str, max_positions: int) -> Path:
    """A random model of `shape` with the embedded byte tokenizer, saved as a Hugging Face dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.models.embedded import build_tokenizer

    if (directory / "config.json").exists():
        return directory
    spec = dict(SHAPES[shape])
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(spec.pop("model_type"), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                                  max_position_embeddings=max_positions, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- workers (one process each)


def generation_worker(model_dir: str, engine: str, device: str, dtype: str, prompts: int, k: int,
                      max_new_tokens: int) -> dict:
    """Tokens/s of one engine: prompts x k samples of max_new_tokens, as the RL stage calls it (keyed noise)."""
    import torch

    from rlhf_cli import data, task
    from rlhf_cli.engines.rollout import SamplingParams, make_engine
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir, "model")
    model = load_causal_lm(model_dir, "model", dtype, torch.device(device))
    options = {"gpu_memory_utilization": 0.3, "max_model_len": 256 + max_new_tokens} if engine == "vllm" else None
    rollout_engine = make_engine(engine, model, tokenizer, options)
    rows = task.prompt_rows(prompts, seed=0)
    texts = [data.prompt_text(tokenizer, row, i, "data") for i, row in enumerate(rows)]
    ids, mask = data.left_pad([data.encode_prompt(tokenizer, t) for t in texts for _ in range(k)],
                              tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    times, tokens = [], 0
    for step in range(2):  # a warm-up call, then the measured one
        rollout_engine.sync_weights(model)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout = rollout_engine.generate(ids, mask, SamplingParams(max_new_tokens, noise_key=(0, step, 0)))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens = int(rollout.response_mask.sum())
    return {"tokens_per_s": tokens / times[-1], "response_tokens": tokens, "seconds": times[-1]}


def trl_worker(model_dir: str, device: str, dtype: str, prompts: int, k: int, max_new_tokens: int, steps: int,
               out_dir: str) -> dict:
    """TRL's GRPO with vLLM colocated: samples/s per optimizer step, the same batch as ours (prompts x k)."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_cli import task
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    def correctness(prompts, completions, answer, **kwargs):  # the rule our runs are scored by
        return [task.correctness_reward(p, c, a) for p, c, a in zip(prompts, completions, answer)]

    timer, batch = Timer(), prompts * k
    args = GRPOConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-6,
                      logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                      use_cpu=not device.startswith("cuda"), bf16=dtype == "bf16", num_generations=k,
                      max_completion_length=max_new_tokens, temperature=1.0, beta=0.0, use_vllm=True,
                      vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    model = load_causal_lm(model_dir, "model", dtype)
    trainer = GRPOTrainer(model=model, reward_funcs=[correctness], args=args, callbacks=[timer],
                          train_dataset=datasets.Dataset.from_list(task.prompt_rows(batch * (steps + 1), seed=0)),
                          processing_class=load_tokenizer(model_dir, "model"))
    trainer.train()
    gaps = [b - a for a, b in zip(timer.times, timer.times[1:])]
    return {"samples_per_s": batch / statistics.median(gaps)}


def worker(kind: str, args: list[str], env: dict | None = None) -> dict:
    """Run a worker in a fresh process -> its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, out, *args],
                              capture_output=True, text=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


# ---------------------------------------------------------------- ours: the real CLI


def rl_samples_per_s(model_dir: Path, engine: str, a: argparse.Namespace, root: Path) -> dict:
    """`rlhf rl` with one engine -> median samples/s and rollout share of the step (first step skipped)."""
    run = root / f"rl-{engine}"
    overrides = [f"policy.path={model_dir}", f"output_dir={run}", f"rollout.engine={engine}", f"device={a.device}",
                 f"max_steps={a.steps}", f"rollout.prompts_per_step={a.prompts}", f"rollout.samples_per_prompt={a.k}",
                 f"rollout.max_new_tokens={a.max_new_tokens}", f"policy.max_length={256 + a.max_new_tokens}",
                 f"policy.dtype={a.dtype}", "algorithm.baseline=group_norm", "eval.every=100000",
                 "checkpoint.every=100000", "data.num_eval=4", "eval.max_new_tokens=4", "log_every=1"]
    if engine == "vllm":
        overrides.append("rollout.vllm.gpu_memory_utilization=0.3")
    proc = subprocess.run([sys.executable, "-m", "rlhf_cli", "rl", *overrides], capture_output=True, text=True,
                          env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    if proc.returncode != 0:
        return {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:300]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"][1:]
    return {k: statistics.median(r[k] for r in train) for k in ("samples_per_s", "time_rollout_frac", "response_len")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, out, rest = sys.argv[2], sys.argv[3], sys.argv[4:]
        if kind == "gen":
            result = generation_worker(rest[0], rest[1], rest[2], rest[3], *map(int, rest[4:7]))
        else:
            result = trl_worker(rest[0], rest[1], rest[2], *map(int, rest[3:7]), rest[7])
        Path(out).write_text(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="qwen0.5b", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--engines", default="lean,hf,vllm")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step / generation call")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="RL steps per engine (the first is not counted)")
    parser.add_argument("--trl", action="store_true", help="also TRL's GRPO with vLLM colocated (pip install trl)")
    parser.add_argument("--root", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--out", default="bench/engines.json")
    a = parser.parse_args()
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    root = Path(a.root or tempfile.mkdtemp(prefix="bench-engines-"))
    model_dir = write_model(root / f"model-{a.shape}", a.shape, a.dtype, 256 + a.max_new_tokens)
    results: dict = {"shape": a.shape, "device": a.device, "dtype": a.dtype, "prompts": a.prompts, "k": a.k,
                     "max_new_tokens": a.max_new_tokens, "generation": {}, "rl": {}}
    for engine in a.engines.split(","):
        results["generation"][engine] = worker("gen", [str(model_dir), engine, a.device, a.dtype, str(a.prompts),
                                                       str(a.k), str(a.max_new_tokens)])
        results["rl"][engine] = rl_samples_per_s(model_dir, engine, a, root)
        print(engine, "generation", results["generation"][engine], "rl", results["rl"][engine], flush=True)
    if a.trl:
        results["rl"]["trl grpo + vllm"] = worker("trl", [str(model_dir), a.device, a.dtype, str(a.prompts), str(a.k),
                                                          str(a.max_new_tokens), str(a.steps), str(root / "trl")])
        print("trl grpo + vllm", results["rl"]["trl grpo + vllm"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
