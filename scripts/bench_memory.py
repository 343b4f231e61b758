"""Peak memory of one RL update's log-prob pass on a large vocabulary (`make bench`; issue 15).

    python scripts/bench_memory.py                      # CPU, ~1 minute
    python scripts/bench_memory.py --device cuda --out bench/memory-cuda.json

The work: a Qwen2-layout model (vocabulary 151,936, the embedded model's tiny body) and the same
body with a 264-token vocabulary; 8 responses of 256 tokens after 32 prompt tokens; one update:
the policy's forward with gradients (log-probs and entropies at temperature 1), the loss
sum(log-probs), its backward and an AdamW step. Computed three ways, each in a fresh process:

    ours        rlhf_cli.models.logprobs.response_terms (chunked, the default)
    ours full   the same with policy.chunked_logprobs=false: (B, T, V) logits, log-softmax, gradient
    trl         TRL's GRPOTrainer._get_per_token_logps_and_entropies (its update's log-prob pass),
                called on the same model and tensors (skipped when TRL is not installed)

Extra memory = peak minus the memory held just before the step (model, inputs, optimizer state
allocated by a first step on 1 token); on CPU from getrusage's peak RSS, on CUDA from
torch.cuda.max_memory_allocated. The vocabulary's cost is the 151,936 figure minus the 264 one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

WORK = dict(rows=8, prompt=32, response=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4)
VOCABS = (151936, 264)
MODES = ("ours", "ours full", "trl")


def current_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2 ** 20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(mode: str, vocab: int, device_name: str) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rlhf_cli.models.logprobs import response_terms

    device = torch.device(device_name)
    torch.manual_seed(0)
    w = WORK
    config = Qwen2Config(vocab_size=vocab, hidden_size=w["hidden_size"], intermediate_size=w["intermediate_size"],
                         num_hidden_layers=w["num_hidden_layers"], num_attention_heads=w["num_attention_heads"],
                         num_key_value_heads=w["num_key_value_heads"], max_position_embeddings=512,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    P, T = w["prompt"], w["response"]

    def logprobs(ids, mask, prompt_len):
        if mode == "trl":
            from trl import GRPOTrainer

            trainer = SimpleNamespace(model_kwarg_keys={"logits_to_keep"}, temperature=1.0, _entropy_bonus_enabled=False)
            logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer, model, ids, mask, ids.shape[1] - prompt_len, batch_size=ids.shape[0], compute_entropy=True)
            return logps
        chunk = 0 if mode == "ours full" else None
        return response_terms(model, ids, mask, prompt_len, 1.0, with_entropy=True, entropy_grad=False,
                              chunk_elements=chunk)[0]

    def step(rows: int, response: int):
        ids = torch.randint(0, vocab, (rows, P + response), device=device)
        mask = torch.ones_like(ids)
        loss = logprobs(ids, mask, P).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, 1)  # optimizer state, allocator warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = current_mb(device)
    step(w["rows"], T)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"mode": mode, "vocab": vocab, "before_mb": before, "peak_mb": peak_mb(device),
            "extra_mb": peak_mb(device) - before}


def trl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def run(mode: str, vocab: int, device: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", mode, str(vocab), device],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench-memory: the {mode} / {vocab} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/memory.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    modes = [m for m in MODES if m != "trl" or trl_installed()]
    if "trl" not in modes:
        print("bench-memory: TRL not installed (make bench-trl installs it): its column is skipped")
    results = [run(mode, vocab, args.device) for mode in modes for vocab in VOCABS]
    by = {(r["mode"], r["vocab"]): r for r in results}
    print(f"one update, {WORK['rows']} x {WORK['response']} response tokens, {args.device}: extra memory (MiB)")
    print(f"{'':12}{'V=151,936':>12}{'V=264':>10}{'vocab cost':>12}")
    for mode in modes:
        big, small = by[(mode, VOCABS[0])]["extra_mb"], by[(mode, VOCABS[1])]["extra_mb"]
        print(f"{mode:12}{big:12.0f}{small:10.0f}{big - small:12.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"work": WORK, "device": args.device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
