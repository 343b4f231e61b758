"""Where one RL step's seconds go, on a real checkpoint, through the real recipe (issue 28).

    python scripts/profile_rl.py --model models/SmolLM2-135M-Instruct --steps 3 --threads 2 \\
        -- data.train=runs/sp1/data/chatsum/prompts_train.jsonl reward.functions=[rlhf_cli.tasks.pretrained.chatsum:reward]

Runs `rlhf rl` in this process (the same compose, checks and loop.run_stage as the CLI) with the recipe's own
methods timed where they are called: sampling (the engine's generate), rewards (rules and reward model), the
reference forward, the old log-prob (and value) forward, the update's forward with gradients, the backward,
the optimizer step, and the rest. Every part is wall time (perf_counter, CUDA synchronised before each
reading), summed over the steps after the first (`--skip`, 1 by default: the first pays warm-up), so the
rows add up to the step. The run takes one step more than --steps, not counted: its last step evaluates and
writes the final checkpoint, which the steps before it do not. A part's time excludes the parts timed inside it: "score (the rest)" is what
score() spends outside its forwards, "update (the rest)" what update() spends outside forward, backward and
optimizer step (the losses, clipping, the step guard); "rest (between the parts)" is the loop around them.

The RL settings are the CLI's defaults for the model (the pretrained defaults for a loaded checkpoint) plus
the overrides after `--`; evaluation and checkpoints are pushed past the run so they do not count. Writes
the table to stdout and, with --out, a JSON of the per-part seconds.

Model FLOPs (issue 28's accounting): each part's forwards are counted as they run (hooks on every decoder's
embedding and LM head: 2 x non-embedding parameters per token embedded, 2 x H x V per row the head computes;
the tokens really run, so a prompt shared by K samples counts once), the backward as twice the update's forward;
each part's GFLOP/s is set against the dense matmul peak measured in the same run (scripts/bench.py), and the
last lines give the update phase's and the whole step's share of that peak. Attention's own FLOPs are left out
(small at these lengths).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ("sampling", "rewards", "rollout (the rest: prompts, padding, dynamic sampling)", "reference forward",
         "old log-probs forward", "score (the rest)", "advantages", "update forward", "backward", "optimizer step",
         "update (the rest)", "logging and checkpoint")


class Clock:
    """Wall seconds per part and step; nested parts count in the innermost only (a part's time excludes the
    parts called inside it), so the parts of a step add up to the step."""

    def __init__(self):
        self.step = 0
        self.seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.flops: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))  # model FLOPs run
        self.stack: list[list] = []  # [name, start, inner seconds]
        self.cuda = torch.cuda.is_available()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def part(self) -> str:
        return self.stack[-1][0] if self.stack else "rest (between the parts)"

    def count_flops(self, model: torch.nn.Module) -> None:
        """Model FLOPs of every forward `model` runs, added to the part running it: 2 x its non-embedding
        parameters per token its decoder embeds (the tokens really run: a shared prompt once), 2 x H x V per row
        its LM head computes (the chunked log-probs and the sampler apply it to response positions only)."""
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        body = sum(p.numel() for p in model.parameters()) - embed.weight.numel()
        if head is not None and head.weight is not embed.weight:
            body -= head.weight.numel()
        embed.register_forward_hook(lambda m, args, out: self._add(2 * body * args[0].numel()))
        if head is not None:
            h, v = head.weight.shape[1], head.weight.shape[0]
            head.register_forward_hook(lambda m, args, out: self._add(2 * h * v * args[0].numel() // h))

    def _add(self, flops: float) -> None:
        if self.part() != "backward":  # a recompute in the backward (checkpointed chunks) is not model FLOPs
            self.flops[self.step][self.part()] += flops

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append([name, self.now(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, inner = self.stack.pop()
                spent = self.now() - start
                self.seconds[self.step][name] += spent - inner
                if self.stack:
                    self.stack[-1][2] += spent
        return timed


def profiled_recipe(clock: Clock):
    from rlhf_cli.stages.rl import RLRecipe

    class Profiled(RLRecipe):
        """The RL recipe with its parts timed (instance attributes wrap the bound methods; nothing else changes)."""

        def setup(self):
            super().setup()
            self.engine.generate = clock.wrap("sampling", self.engine.generate)
            self.side.reward_rows = clock.wrap("rewards", self.side.reward_rows)
            self.side.logprobs_under = clock.wrap("reference forward", self.side.logprobs_under)
            self.no_grad_forward = clock.wrap("old log-probs forward", self.no_grad_forward)
            self.optimizer.step = clock.wrap("optimizer step", self.optimizer.step)
            self.rollout_batch = clock.wrap(PARTS[2], self.rollout_batch)
            self.score = clock.wrap("score (the rest)", self.score)
            self.advantages = clock.wrap("advantages", self.advantages)
            self.update = clock.wrap("update (the rest)", self.update)
            for owner, name in ((self, "step_metrics"), (self, "save_checkpoint"), (self.tracker, "log"),
                                (self.tracker, "advance")):  # step 5 and loop.end_of_step's work
                setattr(owner, name, clock.wrap("logging and checkpoint", getattr(owner, name)))
            self.train_step = self._steps(self.train_step)
            for model in {id(m): m for m in self.models_to_count()}.values():
                clock.count_flops(model)
            self.step_start = None

        def models_to_count(self):
            """The decoders a step runs: the policy, the reference, the critic, the reward model (TokenValues and
            a LoRA reference hold theirs as .model; the LoRA reference's is the policy's own, counted once)."""
            for m in (self.policy, self.reference, self.critic, self.reward_model):
                m = getattr(m, "model", m)
                if isinstance(m, torch.nn.Module) and hasattr(m, "get_input_embeddings"):
                    yield m

        def _steps(self, fn):
            """A step runs from one train_step call to the next: its five parts and loop.end_of_step's tail."""
            def timed(*args, **kwargs):
                now = clock.now()
                if self.step_start is not None:
                    clock.seconds[clock.step]["step"] = now - self.step_start
                    clock.step += 1
                self.step_start = now
                return fn(*args, **kwargs)
            return timed

        def forward(self, ids, attn, P, with_entropy=True):  # no_grad_forward calls it too: timed there
            if torch.is_grad_enabled():
                return clock.wrap("update forward", super().forward)(ids, attn, P, with_entropy)
            return super().forward(ids, attn, P, with_entropy)

    return Profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the policy (an HF dir)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip", type=int, default=1, help="steps not counted (warm-up)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", help="write the per-part seconds as JSON here")
    parser.add_argument("overrides", nargs="*", help="rl overrides (after --)")
    args = parser.parse_args()
    if args.steps <= args.skip:
        sys.exit(f"error: --steps {args.steps} must be more than --skip {args.skip}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("RLHF_NO_PROGRESS", "1")

    from rlhf_cli.commands.compose import compose_config
    from rlhf_cli.training import loop

    clock = Clock()
    torch.autograd.backward = clock.wrap("backward", torch.autograd.backward)  # what Tensor.backward calls
    with tempfile.TemporaryDirectory() as tmp:
        # one step more than counted: the last step evaluates and writes the final checkpoint, which no other does
        overrides = [f"policy.path={args.model}", f"max_steps={args.steps + 1}", "eval.every=1000000",
                     "checkpoint.every=1000000", "data.eval_limit=1", "log_every=1", f"output_dir={tmp}/run",
                     *([f"device.threads={args.threads}"] if args.threads else []), *args.overrides]
        cfg = compose_config("rl", overrides)
        Profiled = profiled_recipe(clock)
        loop.run_stage("rl", cfg, Path(tmp) / "run", Profiled, model_key="policy", placement=cfg.placement)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    counted = [s for s in range(args.skip, args.steps)]
    total = {part: sum(clock.seconds[s].get(part, 0.0) for s in counted) for part in (*PARTS, "step")}
    total["rest (between the parts)"] = total["step"] - sum(total[p] for p in PARTS)
    train = [r for r in rows if r.get("kind", "train") == "train" and "samples_per_s" in r][args.skip:args.steps]
    samples = sum(r["samples_per_s"] for r in train) / max(1, len(train))
    tokens = sum(r.get("response_len", 0) for r in train) / max(1, len(train))
    print(f"profile_rl: {args.model}, {len(counted)} steps counted, torch threads {torch.get_num_threads()}, "
          f"{samples:.2f} samples/s, {tokens:.1f} response tokens a sample")
    flops = {part: sum(clock.flops[s].get(part, 0.0) for s in counted) for part in (*PARTS, "rest (between the parts)")}
    flops["backward"] = 2 * flops["update forward"]  # the backward's model FLOPs: twice the forward's
    flops["step"] = sum(flops.values())
    from bench import matmul_peak_gflops  # scripts/bench.py: the same denominator as make bench's MFU

    compute = torch.bfloat16 if cfg.device.autocast == "bf16" else torch.float32
    peak = matmul_peak_gflops("cuda" if torch.cuda.is_available() else "cpu", compute)
    print(f"{'part':40} {'s / step':>9} {'share':>7} {'GFLOP/s':>9} {'of peak':>8}")
    for part, seconds in total.items():
        rate = flops[part] / seconds / 1e9 if seconds > 0 else 0.0
        print(f"{part:40} {seconds / len(counted):9.2f} {seconds / total['step']:7.1%} {rate:9.1f} {rate / peak:8.1%}")
    update_rate = (flops["update forward"] + flops["backward"]) / (total["update forward"] + total["backward"]) / 1e9
    step_rate = flops["step"] / total["step"] / 1e9
    print(f"matmul peak {peak:.1f} GFLOP/s ({str(compute).removeprefix('torch.')}, measured now); model FLOPs: 2 x "
          f"non-embedding parameters a token run + 2 x H x V a head row, backward 2x the update's forward")
    print(f"update (forward + backward): {update_rate:.1f} GFLOP/s = {update_rate / peak:.1%} of peak; step: "
          f"{flops['step'] / len(counted) / 1e9:.1f} GFLOP a step, {step_rate / peak:.1%} of peak")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "steps_counted": len(counted),
                                              "seconds_per_step": {k: v / len(counted) for k, v in total.items()},
                                              "gflop_per_step": {k: v / len(counted) / 1e9 for k, v in flops.items()},
                                              "matmul_peak_gflops": peak, "update_of_peak": update_rate / peak,
                                              "step_of_peak": step_rate / peak, "overrides": args.overrides},
                                             indent=2))


if __name__ == "__main__":
    main()
