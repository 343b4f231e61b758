"""Ours against TRL 1.12.0 on the same model, data, batch and lengths, in one run (`make bench-trl`).

    pip install -e '.[bench]'                     # TRL 1.12.0 beside the same torch (make bench-trl does it)
    python scripts/bench_trl.py                   # tiny model, CPU, ~10 minutes on 2 cores
    python scripts/bench_trl.py --repeats 2 --device cuda --out bench/trl-cuda.json
    python scripts/bench_trl.py --model models/SmolLM2-135M-Instruct --repeats 1 --threads 2 \
        --out bench/trl-smollm2.json              # a real checkpoint (`make pretrained`): ~40 minutes on 2 cores

Pairs, each run back to back (ours, then TRL) and repeated `--repeats` times
so that both sides see the same machine load:

    sft                    rlhf sft                       vs SFTTrainer      samples/s
    train-rm               rlhf train-rm                  vs RewardTrainer   pairs/s
    dpo                    rlhf dpo (sft_weight=0)        vs DPOTrainer      pairs/s (both with reference log-probs
                           computed before the first step: TRL's precompute_ref_log_probs=True, ours always;
                           --dpo-pairs unrelated: responses that share no start, so only the prompt is shared)
    generation             rollout.sample                vs model.generate  (what GRPO/RLOO/PPO call) tokens/s
                           64 distinct prompts, and 8 prompts x 8 samples (as GRPO / RLOO sample)
    reinforce group_norm   rlhf rl algorithm=reinforce    vs GRPOTrainer     completions/s
    reinforce rloo         ... algorithm.baseline=rloo    vs RLOOTrainer     completions/s
    ppo                    rlhf rl algorithm=ppo reward=rm vs PPOTrainer     completions/s (policy + critic + RM)
    ppo shared critic      ... critic.init=shared          vs the same PPOTrainer runs (value head on the policy)

With --model every pair starts from that checkpoint (the SFT pair from it, the later pairs from the SFT's
final/, as on the tiny model) at S_MODEL's settings: the pretrained defaults' learning rates and a batch a CPU
runs a handful of steps of. The data is the embedded task's on both sides (plain-text prompts, no chat template).
TRL's trainers run with `gradient_checkpointing=False`: TRL 1.12 turns it on in every trainer config by default
(recomputing activations in the backward: less memory, more compute), ours is off by default, and a pair compares
the same work. REINFORCE runs with `algorithm.dynamic_sampling=false`: TRL's trainers draw each batch once, and the redraws would
time more rollouts on our side than on theirs.

Every figure is a median over steps after the first two; the ratio is ours / TRL
(higher is better for us) and, with repeats, the best of each side. Each
trainer runs in its own process; its peak memory is reported beside it.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: CLI runner, metrics, matmul peak)

# One setting for both sides. RL: 64 completions per step (8 prompts x 8 for the group methods, 64 x 1 for PPO).
# Learning rates are our stages' defaults (constant schedule on both sides); the SFT run trains the policy
# every later pair starts from, so responses stop at EOS as a trained policy's do.
S = dict(sft_batch=32, sft_steps=20, sft_lr=6e-3, rm_batch=16, rm_steps=20, rm_lr=3e-3, max_length=160,
         dpo_batch=16, dpo_steps=20, dpo_lr=3e-4, dpo_pairs=1000,
         rl_prompts=8, rl_k=8, ppo_prompts=64, ppo_epochs=2, ppo_minibatches=2, rl_steps=8, rl_lr=3e-4,
         max_new_tokens=40, temperature=1.0, kl_coef=0.02, gen_batch=64)
# A real checkpoint (--model): the pretrained defaults' learning rates (rlhf_cli/config/origin.py) and a CPU-sized batch.
S_MODEL = dict(S, sft_batch=8, sft_steps=5, sft_lr=2e-5, rm_batch=8, rm_steps=5, rm_lr=1e-5, dpo_batch=8, dpo_steps=5,
               dpo_lr=1e-5, dpo_pairs=64, rl_prompts=8, rl_k=4,
               ppo_prompts=16, rl_steps=5, rl_lr=1e-5, gen_batch=32)
TARGETS = {"sft": 2.0, "train-rm": 2.0, "dpo / DPOTrainer": 1.5, "generation": 3.0, "generation, 8 prompts x 8": 3.0, "reinforce group_norm / GRPO": 2.0,
           "reinforce rloo / RLOO": 2.0, "ppo / PPO": 4.0, "ppo critic.init=shared / PPO": 4.0}
# on a real checkpoint (--model): issue 28's bars
TARGETS_MODEL = {**{k: 1.5 for k in TARGETS}, "generation": 2.0, "generation, 8 prompts x 8": 2.0, "ppo / PPO": 2.0,
                 "ppo critic.init=shared / PPO": 2.0}
# pairs whose TRL side is another pair's (run once, in the same repeats): ours with extra overrides
VARIANTS = {"ppo / PPO": [("ppo critic.init=shared / PPO", ["critic.init=shared"])]}


# ---------------------------------------------------------------- TRL workers (each in its own process)


def _trl_common(out_dir: Path, steps: int, batch: int, lr: float, device: str) -> dict:
    return dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, eval_strategy="no",
                use_cpu=not device.startswith("cuda"), bf16=device.startswith("cuda"), seed=0,
                dataloader_num_workers=0, lr_scheduler_type="constant",
                gradient_checkpointing=False)  # TRL 1.12's configs default it on, ours off: the same compute


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time at the end of every optimizer step, and every logged dict."""

        def __init__(self):
            self.times, self.logs = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    return StepTimer()


def _step_s(times: list[float], skip: int = 2) -> float:
    gaps = [b - a for a, b in zip(times, times[1:])][skip:]
    return statistics.median(gaps)


def _mean_log(logs: list[dict], key: str) -> float | None:
    values = [entry[key] for entry in logs[2:] if key in entry]
    return statistics.mean(values) if values else None


def trl_worker(kind: str, root: Path, device: str) -> dict:
    import datasets
    from transformers.utils import logging as hf_logging

    from rlhf_cli import task
    from rlhf_cli.data import encode
    from rlhf_cli.models import load_causal_lm, load_scalar_head_model, load_tokenizer

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = load_tokenizer(str(root / "sft" / "final"), "model")
    timer = _timer()
    out_dir = root / f"trl-{kind}"
    dev = torch.device(device)
    result: dict = {}
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in task.sft_rows(4000, seed=0)]
        args = SFTConfig(**_trl_common(out_dir, S["sft_steps"], S["sft_batch"], S["sft_lr"], device),
                         max_length=S["max_length"], packing=False, completion_only_loss=True)
        model = load_causal_lm(str(root / "base"), "model", device=dev)
        trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok, callbacks=[timer])
        trainer.train()
        result["samples_per_s"] = S["sft_batch"] / _step_s(timer.times)
    elif kind == "rm":
        from trl import RewardConfig, RewardTrainer

        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in task.preference_rows(4000, seed=0)]
        args = RewardConfig(**_trl_common(out_dir, S["rm_steps"], S["rm_batch"], S["rm_lr"], device),
                            max_length=S["max_length"], center_rewards_coefficient=0.01)
        model = load_scalar_head_model(str(root / "sft" / "final"), "model", device=dev)
        trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok, callbacks=[timer])
        trainer.train()
        result["samples_per_s"] = S["rm_batch"] / _step_s(timer.times)
    elif kind == "dpo":
        result["samples_per_s"] = _trl_dpo(root, out_dir, tok, timer, device)
    elif kind in ("grpo", "rloo"):
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        Config, Trainer = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
        rows = task.prompt_rows(4000, seed=0)
        batch = S["rl_prompts"] * S["rl_k"]

        def correctness(prompts, completions, answer, **kwargs):  # the same rule as ours
            return [task.correctness_reward(p, c, a) for p, c, a in zip(prompts, completions, answer)]

        args = Config(**_trl_common(out_dir, S["rl_steps"], batch, S["rl_lr"], device), num_generations=S["rl_k"],
                      max_completion_length=S["max_new_tokens"], temperature=S["temperature"], beta=S["kl_coef"])
        model = load_causal_lm(str(root / "sft" / "final"), "model", device=dev)
        trainer = Trainer(model=model, reward_funcs=[correctness], args=args,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
        trainer.train()
        result["samples_per_s"] = batch / _step_s(timer.times)
        result["response_len"] = _mean_log(timer.logs, "completions/mean_length")
    elif kind == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        prompts = [r["prompt"] for r in task.prompt_rows(4000, seed=0)]
        ids = datasets.Dataset.from_dict({"input_ids": [encode(tok, p) for p in prompts]})
        common = _trl_common(out_dir, S["rl_steps"], S["ppo_prompts"], S["rl_lr"], device)
        common.pop("max_steps")
        args = PPOConfig(**common, total_episodes=S["ppo_prompts"] * S["rl_steps"],
                         num_mini_batches=S["ppo_minibatches"], num_ppo_epochs=S["ppo_epochs"],
                         response_length=S["max_new_tokens"], stop_token="eos",
                         temperature=S["temperature"], kl_coef=S["kl_coef"], num_sample_generations=0,
                         local_rollout_forward_batch_size=S["ppo_prompts"])
        sft_path, rm_path = str(root / "sft" / "final"), str(root / "rm" / "final")
        trainer = PPOTrainer(args=args, processing_class=tok, model=load_causal_lm(sft_path, "policy", device=dev),
                             ref_model=load_causal_lm(sft_path, "reference", device=dev),
                             reward_model=load_scalar_head_model(rm_path, "reward", device=dev),
                             value_model=load_scalar_head_model(sft_path, "critic", device=dev),
                             train_dataset=ids, eval_dataset=ids.select(range(8)), callbacks=[timer])
        trainer.train()
        result["samples_per_s"] = S["ppo_prompts"] / _step_s(timer.times)
    else:
        raise ValueError(kind)
    return result


def _trl_dpo(root: Path, out_dir: Path, tok, timer, device: str) -> float:
    """DPOTrainer on the embedded pairs from the SFT policy, reference log-probs computed before the first step
    (precompute_ref_log_probs: the work our dpo does) -> pairs/s."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from rlhf_cli import task
    from rlhf_cli.models import load_causal_lm

    rows = dpo_rows()
    args = DPOConfig(**_trl_common(out_dir, S["dpo_steps"], S["dpo_batch"], S["dpo_lr"], device),
                     max_length=S["max_length"], beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True)
    model = load_causal_lm(str(root / "sft" / "final"), "model", device=torch.device(device))
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok, callbacks=[timer])
    trainer.train()
    return S["dpo_batch"] / _step_s(timer.times)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def dpo_rows() -> list[dict]:
    """The DPO pair's rows, the same on both sides: the embedded task's pairs (a rejected response is its chosen one
    with a slip, so the two share a long start), or with --dpo-pairs unrelated each rejected response another row's
    chosen one (two answers to different problems: they share no start beyond chance)."""
    from rlhf_cli import task

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in task.preference_rows(S["dpo_pairs"], seed=0)]
    if S.get("dpo_data") == "unrelated":
        for i, row in enumerate(rows):
            row["rejected"] = next(r["chosen"] for r in rows[i + 1:] + rows[:i] if r["chosen"] != row["chosen"])
    return rows


def generation_worker(kind: str, root: Path, device: str, repeats: int) -> dict:
    """rollout.sample (ours) vs model.generate as TRL's GRPO/RLOO call it, alternating on one batch."""
    import inspect

    from transformers import GenerationConfig

    from rlhf_cli import task
    from rlhf_cli.data import encode, left_pad
    from rlhf_cli.engines.rollout import sample
    from rlhf_cli.models import load_causal_lm, load_tokenizer
    from rlhf_cli.training import runtime

    path = str(root / "sft" / "final")
    tok = load_tokenizer(path, "model")
    dev = torch.device(device)
    model = load_causal_lm(path, "model", device=dev).eval()
    K = {"gen": 1, "gen_group": S["rl_k"]}[kind]  # gen_group: K samples per prompt, as GRPO / RLOO sample
    prompts = [r["prompt"] for r in task.prompt_rows(S["gen_batch"] // K, seed=1) for _ in range(K)]
    ids, mask = left_pad([encode(tok, p) for p in prompts], tok.pad_token_id)
    ids, mask = ids.to(dev), mask.to(dev)
    config = GenerationConfig(max_new_tokens=S["max_new_tokens"], do_sample=True, temperature=S["temperature"],
                              top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                              bos_token_id=None, disable_compile=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    keyed = "noise" in inspect.signature(sample).parameters and hasattr(runtime, "keyed_uniform")

    def ours(engine: str = "auto") -> tuple[float, float]:  # as the rl stage calls it, keyed noise included
        sync()
        t0 = time.perf_counter()
        kw = {"noise": runtime.keyed_uniform(0, 0, 0, ids.shape[0], S["max_new_tokens"], dev)} if keyed else {}
        kw["engine"] = engine
        rollout = sample(model, ids, mask, S["max_new_tokens"], tok.eos_token_id, tok.pad_token_id, S["temperature"],
                         **kw)
        tokens = float(rollout.response_mask.sum())
        sync()
        return tokens, time.perf_counter() - t0

    def theirs() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        completion = out[:, ids.shape[1]:]
        is_eos = (completion == tok.eos_token_id).long()
        tokens = float(((is_eos.cumsum(-1) - is_eos) == 0).sum())  # up to and including the first EOS
        sync()
        return tokens, time.perf_counter() - t0

    ours(), theirs()  # warm-up
    rates: dict[str, list[float]] = {"ours": [], "ours_hf": [], "trl": []}
    for _ in range(max(3, 3 * repeats)):
        for name, fn in (("ours", ours), ("ours_hf", lambda: ours("hf")), ("trl", theirs)):
            tokens, seconds = fn()
            rates[name].append(tokens / seconds)
    return {f"{name}_tokens_per_s": statistics.median(r) for name, r in rates.items()}


def worker_main(argv: list[str]) -> None:
    kind, root, device, out, repeats = argv[0], Path(argv[1]), argv[2], Path(argv[3]), int(argv[4])
    S.update(json.loads((root / "settings.json").read_text()))  # the parent's settings (--model changes them)
    result = (generation_worker(kind, root, device, repeats) if kind.startswith("gen")
              else trl_worker(kind, root, device))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev_is_cuda(device):
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    out.write_text(json.dumps(result))


def dev_is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def run_worker(kind: str, root: Path, device: str, repeats: int = 1) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", kind, str(root), device, out,
                               str(repeats)], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            sys.exit(f"bench-trl: the {kind} worker failed:\n{proc.stderr[-4000:]}")
        return json.loads(Path(out).read_text())
    finally:
        os.unlink(out)


# ---------------------------------------------------------------- ours (the real CLI)


def ours(stage: str, root: Path, name: str, device: str, *overrides: str) -> dict:
    """One run of our CLI -> {samples_per_s, peak memory, ...}; a fresh output dir each time."""
    run = root / name
    if run.exists():
        import shutil

        shutil.rmtree(run)
    # TRL's precision (its bf16 flag: on CUDA only); ours would take bf16 on any device with bf16 units
    precision = f"device.autocast={'bf16' if device.startswith('cuda') else 'none'}"
    mem = bench.cli(stage, f"output_dir={name}", *overrides, f"device={device}", precision, "eval.every=100000",
                    "checkpoint.every=100000", "log_every=1", "data.eval_limit=16", cwd=root)
    batch = {"sft": S["sft_batch"], "train-rm": S["rm_batch"], "dpo": S["dpo_batch"]}.get(stage)
    if batch is None:  # rl: rows per step from the overrides
        kv = dict(o.split("=", 1) for o in overrides)
        batch = int(kv["rollout.prompts_per_step"]) * int(kv["rollout.samples_per_prompt"])
    result = {"samples_per_s": batch / bench.median_step_s(run), **mem}
    if stage == "rl":
        result["response_len"] = bench.median_metric(run, "response_len", skip=1)
        for key in ("time_rollout_frac", "time_score_frac", "time_update_frac", "samples_per_s"):
            result[key if key != "samples_per_s" else "loop_samples_per_s"] = bench.median_metric(run, key, skip=1)
    return result


def mean_sft_tokens(model_dir: Path) -> float:
    from rlhf_cli import task
    from rlhf_cli.data import encode
    from rlhf_cli.models import load_tokenizer

    tok = load_tokenizer(str(model_dir), "model")
    return statistics.mean(len(encode(tok, r["prompt"])) + len(encode(tok, r["completion"])) + 1
                           for r in task.sft_rows(500, seed=0))


# ---------------------------------------------------------------- main


def best(runs: list[dict], key: str = "samples_per_s") -> dict:
    return max(runs, key=lambda r: r[key])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/trl.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="run every (ours, TRL) pair this many times")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads on both sides (OMP_NUM_THREADS); default: torch's default")
    parser.add_argument("--model", help="an HF model dir every pair starts from (default: a tiny model built here)")
    parser.add_argument("--only", default="sft,train-rm,dpo,generation,grpo,rloo,ppo",
                        help="comma-separated subset of: sft, train-rm, dpo, generation, grpo, rloo, ppo")
    parser.add_argument("--dpo-pairs", choices=("embedded", "unrelated"), default="embedded",
                        help="the dpo pair's data: the embedded pairs (responses sharing a long start), or each "
                             "rejected response another row's chosen one (no shared start)")
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        sys.exit("bench-trl: TRL is not installed; run `make bench-trl` or `pip install -e '.[bench]'`")
    only = set(args.only.split(","))
    if args.model:
        if not (Path(args.model) / "config.json").exists():
            sys.exit(f"error: --model {args.model} is not a model directory (no config.json); "
                     f"`make pretrained` writes models/SmolLM2-135M-Instruct")
        S.update(S_MODEL)
    if args.threads:  # every child process (ours and TRL's) inherits it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    t_start = time.time()
    log = lambda msg: print(f"bench-trl {time.time() - t_start:6.0f}s {msg}", flush=True)  # noqa: E731
    cuda = dev_is_cuda(args.device)
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else f"cpu ({os.cpu_count()} cores)"
    machine = {"device": device_name, "model": str(Path(args.model).resolve()) if args.model else "tiny (embedded)", "torch": torch.__version__, "trl": trl.__version__,
               "torch_threads": torch.get_num_threads(),
               "load_average_1m_before": os.getloadavg()[0],
               "matmul_peak_gflops": bench.matmul_peak_gflops(args.device, torch.bfloat16 if cuda else torch.float32)}
    pairs: dict[str, dict] = {}
    constant = ["optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model:
            (root / "base").symlink_to(Path(args.model).resolve())
        else:
            bench.write_model(root / "base")
        S["dpo_data"] = args.dpo_pairs
        (root / "settings.json").write_text(json.dumps(S))
        write_jsonl(root / "dpo_pairs.jsonl", dpo_rows())
        # the SFT run that also produces the policy every later pair starts from (timed as repeat 1)
        sft_args = ["model.path=base", f"batch_size={S['sft_batch']}", f"max_steps={S['sft_steps']}",
                    f"model.max_length={S['max_length']}", f"optim.lr={S['sft_lr']}", *constant]
        rm_args = ["model.path=sft/final", f"batch_size={S['rm_batch']}", f"max_steps={S['rm_steps']}",
                   f"model.max_length={S['max_length']}", f"optim.lr={S['rm_lr']}", *constant, "center_coef=0.01"]
        dpo_args = ["model.path=sft/final", f"batch_size={S['dpo_batch']}", f"max_steps={S['dpo_steps']}",
                    "data.train=dpo_pairs.jsonl", "data.eval=dpo_pairs.jsonl", f"model.max_length={S['max_length']}",
                    f"optim.lr={S['dpo_lr']}",
                    *constant, "loss=sigmoid", "beta=0.1", "sft_weight=0"]
        rl_common = ["policy.path=sft/final", f"max_steps={S['rl_steps']}",
                     f"rollout.max_new_tokens={S['max_new_tokens']}", f"rollout.temperature={S['temperature']}",
                     f"kl.coef={S['kl_coef']}", f"optim.lr={S['rl_lr']}", *constant]
        group = [f"rollout.prompts_per_step={S['rl_prompts']}", f"rollout.samples_per_prompt={S['rl_k']}",
                 "algorithm.dynamic_sampling=false"]  # TRL draws each batch once
        specs = {  # name -> (our stage, our overrides, TRL worker)
            "sft": ("sft", sft_args, "sft"),
            "train-rm": ("train-rm", rm_args, "rm"),
            "dpo / DPOTrainer": ("dpo", dpo_args, "dpo"),
            "reinforce group_norm / GRPO": ("rl", [*rl_common, *group, "algorithm=reinforce",
                                                   "algorithm.baseline=group_norm"], "grpo"),
            "reinforce rloo / RLOO": ("rl", [*rl_common, *group, "algorithm=reinforce",
                                             "algorithm.baseline=rloo"], "rloo"),
            "ppo / PPO": ("rl", [*rl_common, f"rollout.prompts_per_step={S['ppo_prompts']}",
                                 "rollout.samples_per_prompt=1", "algorithm=ppo", f"algorithm.epochs={S['ppo_epochs']}",
                                 f"algorithm.minibatches={S['ppo_minibatches']}", "reward=rm",
                                 "reward.model.path=rm/final"], "ppo"),
        }
        for name, (stage, overrides, worker) in specs.items():
            compare = worker in only or name in only
            if not compare and (stage in ("rl", "dpo") or stage == "train-rm" and not {"ppo", "generation"} & only):
                continue  # sft always runs (every later pair starts from it); train-rm for the PPO pair's RM
            runs_ours, runs_trl = [], []
            variants = VARIANTS.get(name, []) if compare else []
            runs_variants: dict[str, list[dict]] = {v: [] for v, _ in variants}
            for r in range(args.repeats if compare else 1):  # sft and train-rm also make the later pairs' models
                log(f"{name}: ours (repeat {r + 1})")
                run_name = {"sft": "sft", "train-rm": "rm", "dpo": "dpo"}.get(stage, f"rl-{worker}")
                runs_ours.append(ours(stage, root, run_name, args.device, *overrides))
                for variant, extra in variants:
                    log(f"{variant}: ours (repeat {r + 1})")
                    runs_variants[variant].append(ours(stage, root, run_name, args.device, *overrides, *extra))
                if compare:
                    log(f"{name}: TRL (repeat {r + 1})")
                    runs_trl.append(run_worker(worker, root, args.device))
            if runs_trl:
                pairs[name] = {"ours": best(runs_ours), "trl": best(runs_trl), "repeats": len(runs_trl)}
                for variant, runs in runs_variants.items():
                    pairs[variant] = {"ours": best(runs), "trl": best(runs_trl), "repeats": len(runs_trl)}
            if stage == "train-rm" and "generation" in only:  # sft/final exists from here on
                for pair, kind in (("generation", "gen"), ("generation, 8 prompts x 8", "gen_group")):
                    log(f"{pair}: ours and model.generate, alternating")
                    g = run_worker(kind, root, args.device, args.repeats)
                    mem = {"peak_rss_mb": g["peak_rss_mb"]}  # one process ran both
                    pairs[pair] = {"ours": {"tokens_per_s": g["ours_tokens_per_s"], **mem},
                                   "trl": {"tokens_per_s": g["trl_tokens_per_s"], **mem},
                                   "ours_engine_hf_tokens_per_s": g["ours_hf_tokens_per_s"],  # the lean engine's share
                                   "repeats": max(3, 3 * args.repeats)}
        sft_tokens = mean_sft_tokens(root / "base")
    machine["load_average_1m_after"] = os.getloadavg()[0]
    machine["wall_s"] = round(time.time() - t_start, 1)
    for name, p in pairs.items():
        key = "tokens_per_s" if name.startswith("generation") else "samples_per_s"
        p["ratio"] = p["ours"][key] / p["trl"][key]
        p["target"] = (TARGETS_MODEL if args.model else TARGETS)[name]
        if name == "sft":
            for side in ("ours", "trl"):
                p[side]["tokens_per_s"] = p[side]["samples_per_s"] * sft_tokens
    results = {"machine": machine, "settings": S, "pairs": pairs}
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out} ({machine['wall_s']:.0f} s)")


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    model = Path(m["model"]).name if m.get("model", "tiny").startswith("/") else "tiny model"
    table = Table(title=f"ours vs TRL {m['trl']} ({model}): {m['device']}, {m['torch_threads']} threads, "
                        f"load {m['load_average_1m_before']:.1f} -> {m['load_average_1m_after']:.1f}")
    for col, justify in (("pair", "left"), ("unit", "left"), ("ours", "right"), ("TRL", "right"),
                         ("ours / TRL", "right"), ("target", "right"), ("peak MB ours / TRL", "right")):
        table.add_column(col, justify=justify)
    for name, p in results["pairs"].items():
        key, unit = {"sft": ("samples_per_s", "seqs/s"), "train-rm": ("samples_per_s", "pairs/s"),
                     "dpo / DPOTrainer": ("samples_per_s", "pairs/s")}.get(
            name, ("tokens_per_s", "tokens/s") if name.startswith("generation") else ("samples_per_s", "compl./s"))
        mem = " / ".join(f"{p[s].get('peak_cuda_mb', p[s]['peak_rss_mb']):,.0f}" for s in ("ours", "trl"))
        ok = "[green]" if p["ratio"] >= p["target"] else "[red]"
        table.add_row(name, unit, f"{p['ours'][key]:,.1f}", f"{p['trl'][key]:,.1f}", f"{ok}{p['ratio']:.2f}x",
                      f"{p['target']:g}x", mem)
    console = Console(width=max(120, Console().width))
    console.print(table)
    for name, p in results["pairs"].items():
        if "ours_engine_hf_tokens_per_s" in p:
            console.print(f"{name}: ours with rollout.engine=hf (the model's own forward) "
                          f"{p['ours_engine_hf_tokens_per_s']:,.0f} tokens/s, "
                          f"{p['ours_engine_hf_tokens_per_s'] / p['trl']['tokens_per_s']:.2f}x TRL")


if __name__ == "__main__":
    main()
