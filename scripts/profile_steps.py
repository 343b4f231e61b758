"""Where a training step's time goes, by kind of kernel (torch.profiler), for the bench-trl settings.

    python scripts/profile_steps.py                       # embedded tiny model, 1 thread
    python scripts/profile_steps.py --model runs/sft/final --threads 2

Profiles the functions the stages call: an SFT step (loss, backward, AdamW), a
reward-model step (chosen and rejected in one forward), and one RL iteration's
parts (sampling 8 prompts x 8, the reference forward, the update's forward and
backward). Each op's self time is put in one bucket: matmul (mm / addmm / bmm),
attention (SDPA kernels), elementwise and reductions (the rest of aten), and
Python / framework overhead (wall time not inside any op). A step that is mostly
matmul is bound by the machine, not by the framework around it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: the embedded model writer)

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def buckets(fn, repeats: int) -> dict[str, float]:
    """Run fn `repeats` times under the profiler -> ms per call in each bucket (+ wall)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        wall = (time.perf_counter() - t0) * 1e3 / repeats
    out = {"matmul": 0.0, "attention": 0.0, "elementwise + reductions": 0.0}
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue
        ms = event.self_cpu_time_total / 1e3 / repeats
        kind = "matmul" if event.key in MATMUL else "attention" if "attention" in event.key else "elementwise + reductions"
        out[kind] += ms
    out["python / framework"] = max(0.0, wall - sum(out.values()))
    out["wall"] = wall
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a causal LM dir (default: the embedded tiny model)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from rlhf_cli import data, task
    from rlhf_cli.engines.rollout import sample
    from rlhf_cli.models import load_causal_lm, load_scalar_head_model, load_tokenizer
    from rlhf_cli.models.logprobs import response_logprobs
    from rlhf_cli.stages.sft import token_loss_sum
    from rlhf_cli.stages.train_rm import Scorer, pair_batch, pair_scores, tokenize_pairs
    from rlhf_cli.training import runtime

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or str(bench.write_model(Path(tmp) / "base"))
        tok = load_tokenizer(path, "model")
        policy = load_causal_lm(path, "model").train()
        rm = Scorer(load_scalar_head_model(path, "model")).train()
    s = {"sft_batch": 32, "rm_batch": 16, "prompts": 8, "k": 8, "max_new_tokens": 40}  # bench_trl.py's settings
    examples, _ = data.tokenize_sft(tok, task.sft_rows(s["sft_batch"], seed=0), 160, "data")
    sft_batch = data.padded_batch(examples, tok.pad_token_id)
    pairs, _ = tokenize_pairs(tok, task.preference_rows(s["rm_batch"], seed=0), 160, "data", False)
    rm_batch = pair_batch(pairs, tok.pad_token_id)
    opt_policy = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    opt_rm = torch.optim.AdamW(rm.parameters(), lr=1e-4)

    def sft_step():
        loss, n = token_loss_sum(policy, sft_batch, "cpu")
        (loss / n).backward()
        opt_policy.step()
        opt_policy.zero_grad()

    def rm_step():
        chosen, rejected = pair_scores(rm, rm_batch, "cpu")
        torch.nn.functional.logsigmoid(chosen - rejected).neg().mean().backward()
        opt_rm.step()
        opt_rm.zero_grad()

    prompts = [r["prompt"] for r in task.prompt_rows(s["prompts"], seed=1) for _ in range(s["k"])]
    ids, mask = data.left_pad([data.encode(tok, p) for p in prompts], tok.pad_token_id)
    noise = runtime.keyed_uniform(0, 0, 0, ids.shape[0], s["max_new_tokens"], torch.device("cpu"))
    rollout = sample(policy, ids, mask, s["max_new_tokens"], tok.eos_token_id, tok.pad_token_id, noise=noise)
    P = ids.shape[1]

    def rl_sample():
        sample(policy, ids, mask, s["max_new_tokens"], tok.eos_token_id, tok.pad_token_id, noise=noise)

    def rl_reference():
        with torch.no_grad():
            response_logprobs(policy, rollout.input_ids, rollout.attention_mask, P)

    def rl_update():
        logprobs = response_logprobs(policy, rollout.input_ids, rollout.attention_mask, P)
        (-(logprobs * rollout.response_mask).sum() / rollout.response_mask.sum()).backward()
        opt_policy.step()
        opt_policy.zero_grad()

    from rich.console import Console
    from rich.table import Table

    params = sum(p.numel() for p in policy.parameters())
    table = Table(title=f"where a step's time goes: {params:,}-parameter model, {torch.get_num_threads()} thread(s)")
    table.add_column("step")
    for col in ("wall ms", "matmul", "attention", "elementwise + reductions", "python / framework"):
        table.add_column(col, justify="right")
    for name, fn in (("sft step (32 seqs)", sft_step), ("train-rm step (16 pairs)", rm_step),
                     ("rl: sample 8 x 8", rl_sample), ("rl: reference forward", rl_reference),
                     ("rl: update fwd + bwd", rl_update)):
        b = buckets(fn, args.repeats)
        table.add_row(name, f"{b['wall']:.1f}", *(f"{b[k] / b['wall']:.0%}" for k in
                                                   ("matmul", "attention", "elementwise + reductions",
                                                    "python / framework")))
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
