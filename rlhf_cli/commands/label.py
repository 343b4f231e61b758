"""`rlhf label input=gens.jsonl judge=rule|rm|human output=prefs.jsonl`: preference pairs from generations.

    rlhf label input=gens.jsonl judge=rule reward.functions=[rlhf_cli.task:correctness_reward] output=prefs.jsonl
    rlhf label input=gens.jsonl judge=rm reward.model.path=runs/big_rm/final pairs=all margin=true output=prefs.jsonl
    rlhf label input=gens.jsonl judge=rule reward.functions=[mypkg.rules:exact] mine=disagree \\
        reward.model.path=runs/rm/final output=hard_pairs.jsonl
    rlhf label input=gens.jsonl judge=human port=8765 labeler=ana output=prefs.jsonl   # a page on 127.0.0.1

The second step of the RLHF loop (docs/loop.md). `input` is what `rlhf generate`
writes: one row per prompt with `prompt` and `responses` (a list of >= 2 strings).
The judge scores every response and each prompt gives prompt/chosen/rejected pairs
where the scores differ: the best against the worst (pairs=best_worst) or every
ordered pair (pairs=all); margin=true adds the score gap as `margin` (train-rm
reads it). The row's other columns (e.g. `answer`) are kept on each pair.

- judge=rule: the sum of `reward.functions`, called as in `rlhf rl` (f(prompt, response, **row)).
- judge=rm: the scores of the reward model at `reward.model.path` (AI feedback from a stronger RM).
- judge=human: a local page that shows the pairs to people (rlhf_cli/commands/label_page.py).
- mine=disagree reward.model.path=RM (with judge=rule): keep only the pairs that RM does
  not rank above the judge's choice: the RM's blind spots, found in the policy's own samples.
"""

from __future__ import annotations

import getpass
import json
import math
import os
from itertools import permutations
from pathlib import Path

from rlhf_cli.commands import helptext, label_page
from rlhf_cli.commands.generate import print_keys
from rlhf_cli.config.tools import LabelToolConfig, parse_settings
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.training.tracking import console


def main(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        helptext.print_text(__doc__.strip())
        print_keys(LabelToolConfig, "label")
        return
    cfg = parse_settings(LabelToolConfig, args, "label", "input=gens.jsonl judge=rule output=prefs.jsonl")
    rows = read_generations(cfg.input)
    output = Path(cfg.output).expanduser()
    if not output.absolute().parent.is_dir():
        raise UserError(f"output: the directory of {cfg.output} does not exist; create it or choose another output=...")
    if cfg.judge == "human":
        label_page.serve(rows, output, cfg.pairs, cfg.port, cfg.labeler or _login())
        return
    if output.exists():
        raise UserError(f"output: {output} exists; choose another output=... or remove it (judge={cfg.judge} "
                        f"writes a whole new file)")
    label(rows, output, cfg)


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in a container: a plain default
        return "labeler"


# ---------------------------------------------------------------- input


def read_generations(spec: str) -> list[dict]:
    """Rows of a generations file, each with a text `prompt` and >= 2 text `responses`."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"input: {spec} not found; give the file `rlhf generate` wrote, e.g. input=gens.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"input: {spec} line {lineno} is not valid JSON ({e}); fix or remove that line") from None
            check_generation_row(row, spec, lineno)
            rows.append(row)
    if not rows:
        raise DataError(f"input: {spec} has no rows; run `rlhf generate ... output={spec}` first")
    return rows


def check_generation_row(row, spec: str, lineno: int) -> None:
    where = f"input: {spec} line {lineno}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is not a JSON object; each line must be one row")
    responses = row.get("responses")
    if responses is None:
        raise DataError(f"{where} has no `responses` (fields {sorted(row)}); give a generations file written by "
                        f"`rlhf generate` (prompt + responses per row), not a pairs or prompts file")
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f"{where}: `responses` must be a list of strings (got {type(responses).__name__})")
    if len(responses) < 2:
        raise DataError(f"{where} has {len(responses)} response(s); a pair needs >= 2: generate with samples_per_prompt>=2")
    stopped = row.get("stopped")
    if stopped is not None and (not isinstance(stopped, list) or len(stopped) != len(responses)
                                or not all(isinstance(x, bool) for x in stopped)):
        raise DataError(f"{where}: `stopped` must be one true/false a response ({len(responses)}), as rlhf generate "
                        f"writes it; fix or drop the column")
    if not isinstance(row.get("prompt"), str):
        raise DataError(f"{where}: `prompt` must be the prompt text (got {type(row.get('prompt')).__name__})")


# ---------------------------------------------------------------- scores and pairs


def rule_scores(rows: list[dict], functions: list[str]) -> list[list[float]]:
    """Per row, per response: the sum of the rule functions (step rewards summed over steps), unweighted."""
    from rlhf_cli.rewards.sources import rule_sources

    sources = rule_sources(functions)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    others = [{k: v for k, v in row.items() if k not in ("responses", "stopped")} for row in rows for _ in row["responses"]]
    try:
        flat = sum(s.score(prompts, [r for row in rows for r in row["responses"]], others).values for s in sources)
    except UserError as e:
        raise UserError(f"judge=rule: {e}; each function must return a number (or (end_char, value) "
                        f"step pairs) for every response") from None
    return regroup(rows, flat.tolist() if sources else [0.0] * len(prompts))


def regroup(rows: list[dict], flat: list[float]) -> list[list[float]]:
    """A flat list of every row's responses' scores -> one list a row."""
    out, i = [], 0
    for row in rows:
        out.append(flat[i:i + len(row["responses"])])
        i += len(row["responses"])
    return out


def check_reward_model(path: str) -> None:
    """A one-line error when reward.model.path is missing or not a reward model, read from its manifest and
    config.json: before any rule runs or any weights load."""
    from rlhf_cli.models import REWARD_MODEL, check_model_dir, check_model_kind
    from rlhf_cli.training.checkpoint import read_manifest

    stage = read_manifest(path).get("stage")
    if stage is not None and stage != "train-rm":
        raise UserError(f"reward.model.path: {path} is not a reward model (its manifest says stage {stage!r}); "
                        f"give a train-rm final/")
    check_model_dir(path, "reward.model.path")
    check_model_kind(path, "reward.model.path", REWARD_MODEL)


def load_reward_model(cfg: LabelToolConfig):
    """reward.model.path, frozen, as a reward source (rewards.sources.ModelReward: raw scores, batch_size rows a
    forward)."""
    import torch

    from rlhf_cli.models import frozen, load_scalar_head_model, load_tokenizer
    from rlhf_cli.rewards.sources import ModelReward
    from rlhf_cli.training.runtime import resolve_device

    path = cfg.reward.model.path
    tokenizer = load_tokenizer(path, "reward.model.path")
    device = resolve_device(cfg.device.type, key="device.type")
    if cfg.device.threads:
        torch.set_num_threads(cfg.device.threads)
    model = frozen(load_scalar_head_model(path, "reward.model.path", cfg.reward.model.dtype, device))
    return ModelReward(model, tokenizer, device, batch_size=cfg.batch_size)


def rm_scores(rows: list[dict], rm) -> list[list[float]]:
    """Per row, per response: the raw score of the reward model `rm` (load_reward_model)."""
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    return regroup(rows, rm.score(prompts, [r for row in rows for r in row["responses"]], rows).values.tolist())


def finished(row: dict, unfinished: str = "drop") -> list[int]:
    """Indices of the row's responses a pair may use: not empty, and (unfinished=drop) not cut at max_new_tokens
    (a row without `stopped`, from an older rlhf generate or another tool, counts every response as stopped)."""
    stopped = row.get("stopped") if unfinished == "drop" and row.get("stopped") else [True] * len(row["responses"])
    return [i for i, (response, done) in enumerate(zip(row["responses"], stopped)) if response.strip() and done]


def make_pairs(rows: list[dict], scores: list[list[float]], pairs: str, margin: bool,
               unfinished: str = "drop") -> list[dict]:
    """prompt/chosen/rejected rows where the judge's scores differ (and the texts do). Left out of every pair: an
    empty response (a policy that stopped at once: train-rm refuses an empty side as a missing text) and one cut at
    max_new_tokens (`stopped` false in rlhf generate's row: an unfinished answer; dpo would teach the policy to
    stop where it was cut, and a reward model to rank a fragment; unfinished=keep pairs them)."""
    out = []
    for row, per in zip(rows, scores):
        real = finished(row, unfinished)
        if pairs == "best_worst":
            best = max(real, key=lambda i: per[i], default=None)
            worst = min(real, key=lambda i: per[i], default=None)
            candidates = [(best, worst)] if real else []
        else:
            candidates = list(permutations(real, 2))
        other = {k: v for k, v in row.items()
                 if k not in ("prompt", "responses", "stopped", "chosen", "rejected", "margin")}
        for i, j in candidates:
            if per[i] > per[j] and row["responses"][i] != row["responses"][j]:
                pair = {"prompt": row["prompt"], "chosen": row["responses"][i], "rejected": row["responses"][j]}
                if margin:
                    pair["margin"] = per[i] - per[j]
                out.append({**pair, **other})
    return out


def label(rows: list[dict], output: Path, cfg: LabelToolConfig) -> None:
    """Judge every response, pair them, mine the RM's disagreements if asked, write the pairs file."""
    if cfg.reward.model.path and (cfg.judge == "rm" or cfg.mine == "disagree"):
        check_reward_model(cfg.reward.model.path)
    if cfg.judge == "rule":
        scores = rule_scores(rows, cfg.reward.functions)
        rm = load_reward_model(cfg) if cfg.mine == "disagree" else None
    else:
        rm = load_reward_model(cfg)
        scores = rm_scores(rows, rm)
    for per in scores:
        if not all(math.isfinite(s) for s in per):
            raise UserError("judge: a score is not finite (NaN or inf); check the reward model or rule functions")
    pairs = make_pairs(rows, scores, cfg.pairs, cfg.margin, cfg.unfinished)
    judged = len(pairs)
    if cfg.mine == "disagree" and pairs:
        prompts, rows_of = [p["prompt"] for p in pairs], [{} for _ in pairs]
        chosen = rm.score(prompts, [p["chosen"] for p in pairs], rows_of).values.tolist()
        rejected = rm.score(prompts, [p["rejected"] for p in pairs], rows_of).values.tolist()
        agree = sum(c > r for c, r in zip(chosen, rejected))
        console.print(f"reward model {cfg.reward.model.path} ranks {agree}/{judged} judged pairs the judge's way "
                      f"({agree / judged:.1%}); keeping the {judged - agree} it gets wrong", markup=False,
                      soft_wrap=True)
        pairs = [p for p, c, r in zip(pairs, chosen, rejected) if c <= r]
    write_rows(output, pairs)
    ties = sum(1 for per in scores if max(per) == min(per))
    empty = sum(1 for row in rows for response in row["responses"] if not response.strip())
    cut = 0 if cfg.unfinished == "keep" else sum(
        1 for row in rows for response, done in zip(row["responses"], row.get("stopped") or []) if response.strip() and not done)
    console.print(f"wrote {output}: {len(pairs)} pairs from {len(rows)} prompts (judge={cfg.judge}, "
                  f"pairs={cfg.pairs}; {ties} prompts had no score difference"
                  f"{f'; {empty} empty responses left out' if empty else ''}"
                  f"{f'; {cut} responses cut at max_new_tokens left out (generate with more max_new_tokens)' if cut else ''})",
                  markup=False, soft_wrap=True)


def write_rows(output: Path, rows: list[dict]) -> None:
    """The whole file at once (temp file + rename): a kill never leaves half a pairs file."""
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)

