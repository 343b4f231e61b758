"""Memory by token budget on the real checkpoint (docs/memory.md): what a micro-batch costs and what a stage peaks at.

    python scripts/memory_real.py calibrate                 # fwd+bwd tokens/s and peak RSS per micro-batch size
    python scripts/memory_real.py rl --prompts 16 64        # peak RSS of one `rlhf rl` step at each batch
    python scripts/memory_real.py sft --batch 8 32          # one `rlhf sft` step of 1024-token rows at each batch
    python scripts/memory_real.py train-rm --batch 8 32     # one `rlhf train-rm` step of 512-token pairs
    python scripts/memory_real.py sft --batch 8 32 --words 700   # the figures in docs/memory.md (741-token rows)

Every figure comes from a fresh process (peak RSS is getrusage's, which only grows), on
models/SmolLM2-135M-Instruct (`make pretrained`). `calibrate` runs the policy's forward and backward through
rlhf_cli.models.logprobs.response_terms on rows of --row tokens, `--sizes` tokens per micro-batch, and prints the
tokens/s, the peak RSS over the resident weights and optimizer state, and memory.activation_bytes_per_token's
estimate for the same rows. The stage modes run the real CLI with every setting at its default but the data, the
step count and the batch named.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"


def calibrate_one(tokens: int, row: int, threads: int) -> dict:
    import torch

    from rlhf_cli.models import load_causal_lm
    from rlhf_cli.models.logprobs import response_terms
    from rlhf_cli.training import memory

    torch.set_num_threads(threads)
    model = load_causal_lm(str(MODEL), "model.path")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-7)
    rows = max(1, tokens // row)
    ids = torch.randint(100, 40000, (rows, row))
    mask = torch.ones_like(ids)

    def step():
        logprobs, _, _ = response_terms(model, ids, mask, row // 2)
        logprobs.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer state allocated, allocator warm
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[1]) * 4096
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shape = memory.ModelShape.of(str(MODEL))
    return {"tokens": rows * row, "row": row, "tokens_per_s": rows * row / seconds,
            "held_gib": held / 2 ** 30, "peak_gib": peak / 2 ** 30,
            "measured_mib_per_token": (peak - held) / (rows * row) / 2 ** 20,
            "estimated_mib_per_token": memory.activation_bytes_per_token(shape, row) / 2 ** 20}


def chat_rows(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = ("the cat sat on a warm mat while rain fell over the quiet town and people walked home slowly "
             "talking about food weather books music and the news of the day").split()
    return [{"messages": [{"role": "user", "content": f"Tell me a story number {i}."},
                          {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(words))}]}
            for i in range(n)]


def peak_of(args: list[str], cwd: Path) -> dict:
    """Run `python -m rlhf_cli ARGS` in a fresh process -> its exit code, peak RSS (GiB), wall seconds."""
    t0 = time.time()
    # a wrapper process of its own, so that getrusage's children peak is this run's alone
    wrapper = ("import resource, subprocess, sys; rc = subprocess.call([sys.executable, '-m', 'rlhf_cli', *sys.argv[1:]]); "
               "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    out = proc.stdout + proc.stderr
    peak = int(out.split("PEAK_KIB", 1)[1].split()[0])
    plan = next((line for line in out.splitlines() if "micro-batches of at most" in line), "")
    return {"exit": proc.returncode, "peak_gib": round(peak / 2 ** 20, 2), "wall_s": round(time.time() - t0, 1),
            "plan": plan.strip(), "tail": [line for line in out.strip().splitlines() if "PEAK_KIB" not in line][-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("calibrate", "calibrate-one", "rl", "sft", "train-rm"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--row", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--words", type=int, help="words per assistant turn (default: 980 sft, 470 train-rm; "
                                                  "a word is about a token)")
    parser.add_argument("--extra", default="", help="more overrides for the stage runs (space-separated)")
    args = parser.parse_args()
    if args.mode == "calibrate-one":
        print(json.dumps(calibrate_one(args.sizes[0], args.row, args.threads)))
        return
    if args.mode == "calibrate":
        for size in args.sizes:
            out = subprocess.run([sys.executable, __file__, "calibrate-one", "--sizes", str(size), "--row",
                                  str(args.row), "--threads", str(args.threads)], capture_output=True, text=True)
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1], flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix=f"memory-{args.mode}-"))
    common = [f"device.threads={args.threads}", "device=cpu", "eval.every=100000", *args.extra.split()]
    if args.mode == "rl":
        rng = random.Random(0)
        rows = []
        for _ in range(max(args.prompts)):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}],
                         "answer": str(a + b)})
        (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / "rule.py").write_text("def correct(prompt, response, answer=None, **row):\n"
                                      "    return float(response.strip() == str(answer))\n")
        for prompts in args.prompts:
            result = peak_of(["rl", f"policy.path={MODEL}", f"output_dir={work / f'rl{prompts}'}", "max_steps=1",
                              f"data.train={work / 'prompts.jsonl'}", f"data.eval={work / 'prompts.jsonl'}",
                              "data.eval_limit=2", "eval.max_new_tokens=4", "reward.functions=[rule:correct]",
                              "eval.rule=rule:correct", f"rollout.prompts_per_step={prompts}",
                              f"rollout.max_new_tokens={args.max_new_tokens}", *common], work)
            print(json.dumps({"stage": "rl", "prompts_per_step": prompts, **result}), flush=True)
    else:
        words = args.words or (980 if args.mode == "sft" else 470)  # ~1024 / ~512 tokens rendered
        rows = chat_rows(max(args.batch), words)
        if args.mode == "sft":
            (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            data = [f"data.train={work / 'train.jsonl'}", f"data.eval={work / 'train.jsonl'}", "data.eval_limit=1",
                    "model.max_length=1100", "eval.max_new_tokens=4"]
        else:
            pairs = [{"prompt": r["messages"][:1], "chosen": r["messages"][1]["content"],
                      "rejected": " ".join(sorted(r["messages"][1]["content"].split()))} for r in rows]  # same length
            (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            data = [f"data.train={work / 'pairs.jsonl'}", f"data.eval={work / 'pairs.jsonl'}", "model.max_length=1100"]
        for batch in args.batch:
            result = peak_of([args.mode, f"model.path={MODEL}", f"output_dir={work / f'{args.mode}{batch}'}",
                              "max_steps=1", f"batch_size={batch}", *data, *common], work)
            print(json.dumps({"stage": args.mode, "batch_size": batch, **result}), flush=True)


if __name__ == "__main__":
    main()
