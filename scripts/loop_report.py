"""The loop's table per round: the policy's held-out accuracy and its reward model's accuracy on the policy's own
held-out samples (what `make -f scripts/loop.mk report` prints; docs/loop.md).

    python scripts/loop_report.py runs/loop 2        # RUNS, ROUNDS: reads rl{k}/final, rm{k}/final, heldpairs{k}.jsonl

For round k, `rl{k}` is the policy trained against `rm{k}`. Its held-out accuracy is the stage's own (the
manifest's `eval_accuracy`, greedy, `eval.rule`). `heldpairs{k}.jsonl` holds pairs that `rlhf label judge=rule
pairs=all` built from `rl{k}`'s samples on held-out prompts (no training file holds them): the share `rm{k}`
ranks the rule's way is the reward model's accuracy where it matters, on what the policy it trained writes.
Ties count half. Writes RUNS/report.md and RUNS/report.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhf_cli.models import frozen, load_scalar_head_model, load_tokenizer
from rlhf_cli.models.scoring import score_texts
from rlhf_cli.training.checkpoint import read_manifest


def rm_agreement(rm_dir: Path, pairs_file: Path) -> tuple[float, int]:
    """(share of pairs rm_dir scores chosen above rejected, ties half; number of pairs)."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines() if line.strip()]
    if not rows:
        return float("nan"), 0
    tokenizer = load_tokenizer(str(rm_dir), "reward.model.path")
    model = frozen(load_scalar_head_model(str(rm_dir), "reward.model.path", "fp32", "cpu"))
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tokenizer, prompts, [r["chosen"] for r in rows], "cpu")
    rejected = score_texts(model, tokenizer, prompts, [r["rejected"] for r in rows], "cpu")
    right = (chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum()
    return right.item() / len(rows), len(rows)


def main(runs: Path, rounds: int) -> None:
    table = []
    for k in range(rounds + 1):
        manifest = read_manifest(str(runs / f"rl{k}" / "final"))
        agree, n = rm_agreement(runs / f"rm{k}" / "final", runs / f"heldpairs{k}.jsonl")
        table.append({"round": k, "policy_held_out": manifest["metrics"]["eval_accuracy"],
                      "rm_on_policy_pairs": agree, "pairs": n})
    lines = ["| round | policy held-out accuracy | RM on the policy's held-out pairs |", "|---|---|---|"]
    lines += [f"| {r['round']} | {r['policy_held_out']:.1%} | {r['rm_on_policy_pairs']:.1%} ({r['pairs']} pairs) |"
              for r in table]
    (runs / "report.json").write_text(json.dumps(table, indent=2) + "\n")
    (runs / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/loop_report.py RUNS ROUNDS")
    main(Path(sys.argv[1]), int(sys.argv[2]))
