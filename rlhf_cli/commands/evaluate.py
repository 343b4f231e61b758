"""`rlhf eval CHECKPOINT [key=value ...] [--json OUT.json]`: score a policy on held-out prompts.

    rlhf eval runs/rl/final                                        # the embedded task's held-out prompts
    rlhf eval runs/rl/final reward.model.path=runs/rm/final device=cpu device.threads=2 --json eval.json
    rlhf eval runs/sft/final data.eval=test.jsonl eval.rule=mypkg.rules:exact eval.show_samples=5
    rlhf eval runs/rl/final eval.samples=8 --json eval.json         # + pass@1, pass@8, maj@8 from 8 samples each
    rlhf eval runs/rl-env/final --json eval.json                    # an rl run over episodes: its env and data.eval

CHECKPOINT is a policy's final/ (sft or rl) or the run dir holding it. Greedy
responses to the held-out prompts are checked by eval.rule (held-out accuracy,
the stages' own function), scored by a reward model when reward.model.path= is set,
and measured (mean characters and tokens); a few are shown in a table. With
eval.samples=K, K responses per prompt are also sampled (eval.temperature) and
checked by the same rule: pass@1 (their mean), pass@k for k in eval.pass_k (the
unbiased estimator of Chen et al. 2021) and maj@k (the majority final answer of
k samples, rlhf_cli.reasoning.answer_key), under those names in the JSON.
Unset seed / data.num_eval / data.eval_limit / eval.max_new_tokens follow the
checkpoint's own run (its manifest), so the embedded held-out split and the
numbers match what that run reported. Keys are named as in the stages
(`device=cpu` or `device.type`, `device.threads`, `model.dtype`,
`reward.model.path`); `rlhf eval --help` lists every key.

With an environment (env.name=module:Class, or unset for a checkpoint of an rl run that had one: that run's
env.name and data.eval), greedy held-out episodes: accuracy is the share the environment called solved, with the
mean turns, return and env errors; each generation carries its episode (turns, turn rewards, the conversation,
how it ended; docs/environments.md).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rlhf_cli import task
from rlhf_cli.commands import helptext
from rlhf_cli.config import field_docs
from rlhf_cli.config.tools import DEFAULT_RULE, EvalToolConfig, parse_overrides
from rlhf_cli.envs import env_class, transcript
from rlhf_cli.errors import UserError
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.training import memory
from rlhf_cli.training.tracking import console, fmt_value

USAGE = "usage: rlhf eval CHECKPOINT [key=value ...] [--json OUT.json]"


def parse_args(args: list[str]) -> tuple[str, list[str], str | None]:
    checkpoint, overrides, json_out = None, [], None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--json", "-j"):
            if i + 1 >= len(args):
                raise UserError(f"{a} needs a file name, e.g. --json eval.json")
            json_out, i = args[i + 1], i + 2
            continue
        if a.startswith("--json="):
            json_out = a.split("=", 1)[1]
        elif a.startswith("-"):
            raise UserError(f"unknown flag {a}; {USAGE}")
        elif "=" in a and not (checkpoint is None and Path(a).expanduser().exists()):  # sweep dirs hold '='
            overrides.append(a)
        elif checkpoint is None:
            checkpoint = a
        else:
            raise UserError(f"one CHECKPOINT only (got {checkpoint!r} and {a!r}); settings are key=value")
        i += 1
    if checkpoint is None:
        raise UserError(f"no CHECKPOINT given; {USAGE} (e.g. rlhf eval runs/rl/final)")
    return checkpoint, overrides, json_out


def print_help() -> None:
    """On stdout, plain lines outside a terminal (rlhf_cli/commands/helptext.py)."""
    helptext.print_text(__doc__.strip())
    defaults = dataclasses.asdict(EvalToolConfig())
    rows = []
    for key, _, help_text in field_docs(EvalToolConfig):
        value = defaults
        for part in key.split("."):
            value = value[part]
        rows.append((key, helptext.render(value), help_text))
    helptext.print_keys("keys of `rlhf eval`", rows)


def _is_model_dir(path: Path) -> bool:
    """A Hugging Face model dir, or a LoRA adapter dir (it loads as its base with the adapter merged)."""
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def resolve_checkpoint(spec: str) -> Path:
    """A final/ dir, or a run dir holding one."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint {spec} does not exist; give a final/ dir, e.g. runs/rl/final")
    if _is_model_dir(path / "final"):  # a run dir (its own config.json is the run's config)
        path = path / "final"
    if not _is_model_dir(path):
        raise UserError(f"checkpoint {spec} is not a Hugging Face model directory (no config.json); "
                        f"give a final/ dir, e.g. runs/rl/final")
    return path


def main(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        print_help()
        return
    spec, overrides, json_out = parse_args(args)
    cfg = parse_overrides(EvalToolConfig, overrides, "eval")
    ckpt = resolve_checkpoint(spec)
    if json_out and not Path(json_out).expanduser().absolute().parent.is_dir():
        raise UserError(f"--json {json_out}: its directory does not exist")
    result = evaluate(ckpt, cfg)
    show(result)
    if json_out:
        from rlhf_cli.training.checkpoint import write_json

        write_json(Path(json_out).expanduser(), result)

        console.print(f"wrote {json_out}", markup=False)


def decode_plan(setting, device, path: str, model_cfg, tokenizer, prompts: list[str], max_new_tokens: int):
    """The tools' memory plan (rlhf eval, rlhf generate) for their longest row, before the weights load: a
    budget below one row is one error line."""
    from rlhf_cli.data import encode

    longest = max((len(encode(tokenizer, p)) for p in prompts), default=1) + max_new_tokens
    return memory.inference_plan(setting, device, path, model_cfg.dtype, longest, model_cfg.trust_remote_code)


def _from_run(manifest: dict, dotted: str, fallback):
    node = manifest.get("config") or {}
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return fallback if node is None else node


def evaluate(ckpt: Path, cfg: EvalToolConfig) -> dict:
    """Greedy held-out generations of the policy at ckpt -> a JSON-ready result dict."""
    # torch and the model code load here, not at the top: `rlhf eval --help` and bad arguments answer at once
    import torch

    from rlhf_cli import data
    from rlhf_cli.engines.rollout import check_engine, make_engine
    from rlhf_cli.models import (CAUSAL_LM, check_generation_fits, check_model_kind, load_causal_lm, load_tokenizer,
                                 position_limit)
    from rlhf_cli.training.evaluation import held_out_accuracy, sampled_accuracy
    from rlhf_cli.training.runtime import resolve_device

    t0 = time.time()
    manifest = _policy_manifest(ckpt)
    seed, num_eval, eval_limit, eval_cfg = _settings(cfg, manifest)
    rm_path = cfg.reward.model.path
    rm_manifest = _reward_model_manifest(rm_path)
    check_model_kind(str(ckpt), "CHECKPOINT", CAUSAL_LM)  # from config.json: no weights yet

    rows, source = _eval_rows(cfg, seed, num_eval, eval_limit, manifest)  # first: a data problem fails before any weights load
    tokenizer = load_tokenizer(str(ckpt), "CHECKPOINT", cfg.model.trust_remote_code)
    env_name, env_cls, prompts = _prompts(cfg, manifest, tokenizer, rows)
    if eval_cfg.rule and eval_cfg.rule != DEFAULT_RULE:
        import_reward_function(eval_cfg.rule, "eval.rule")
    check_generation_fits(str(ckpt), {"eval.max_new_tokens": eval_cfg.max_new_tokens})  # before the weights load
    check_engine(cfg.rollout.engine, str(ckpt), "CHECKPOINT")  # vllm: an architecture it runs
    device = resolve_device(cfg.device.type, key="device.type")
    if cfg.device.threads:
        torch.set_num_threads(cfg.device.threads)
    plan = decode_plan(cfg.micro_batch_tokens, device, str(ckpt), cfg.model, tokenizer, prompts,
                       eval_cfg.max_new_tokens)
    model = load_causal_lm(str(ckpt), "CHECKPOINT", cfg.model.dtype, device, cfg.model.trust_remote_code)
    # vllm: its own copy of the weights, pushed once; local engines: decode calls of plan.generate_rows rows at most
    engine = make_engine(cfg.rollout.engine, model, tokenizer, memory=plan)
    if env_cls is not None:
        return _episodes_result(ckpt, manifest, cfg, eval_cfg, env_cls, env_name, engine, tokenizer, rows, prompts,
                                source, device, plan, t0, seed)
    with torch.no_grad():
        accuracy, _, mean_chars, responses = held_out_accuracy(engine, tokenizer, rows, prompts, eval_cfg, device,
                                                               position_limit(str(ckpt)))
    checks = _checks(rows, prompts, responses, eval_cfg.rule) if accuracy is not None else [None] * len(rows)
    sampled, correct_samples = {}, [None] * len(rows)
    if eval_cfg.samples and accuracy is not None:  # K samples per prompt, checked by the same rule
        with torch.no_grad():
            sampled, correct_samples = sampled_accuracy(engine, tokenizer, rows, prompts, eval_cfg, device,
                                                        eval_cfg.rule, seed, position_limit(str(ckpt)))
    del model, engine

    metrics = {"prompts": len(rows), **({"accuracy": accuracy} if accuracy is not None else {}),
               **sampled}  # sampled: pass@1, pass@k, maj@k
    rm_scores = (_rm_scores(cfg, rm_manifest, prompts, responses, device, plan.infer_tokens, metrics)
                 if rm_path else None)
    metrics["response_chars"] = mean_chars
    metrics["response_tokens"] = sum(len(data.encode(tokenizer, r)) for r in responses) / max(1, len(responses))
    generations = _generations(prompts, responses, checks, rm_scores, correct_samples if sampled else None)
    return {"checkpoint": str(ckpt), "stage": manifest.get("stage"), "data": source,
            "rule": eval_cfg.rule if accuracy is not None else None, "reward_model": rm_path,
            "max_new_tokens": eval_cfg.max_new_tokens, "memory": plan.describe(), **({"samples_per_prompt": eval_cfg.samples} if sampled else {}),
            "metrics": metrics, "wall_time_s": round(time.time() - t0, 2),
            "samples": generations[: eval_cfg.show_samples], "generations": generations}


def _prompts(cfg: EvalToolConfig, manifest: dict, tokenizer, rows: list[dict]) -> tuple[str | None, type | None, list]:
    """-> (env.name or None, its class, the prompt texts): the rows' prompts, or with an environment (env.name, else
    the checkpoint's rl run's) the openings it gives each row (a reset that fails is one error line)."""
    from rlhf_cli import data

    env_name = cfg.env.name or _from_run(manifest, "env.name", None)
    env_cls = env_class(env_name) if env_name else None
    return env_name, env_cls, data.prompt_texts(tokenizer, rows, "data.eval", env_cls, cfg.env.timeout_s)


def _episodes_result(ckpt: Path, manifest: dict, cfg: EvalToolConfig, eval_cfg, env_cls, env_name: str, engine,
                     tokenizer, rows, prompts, source, device, plan, t0: float, seed: int) -> dict:
    """Greedy held-out episodes against the environment -> the result dict: accuracy (the share it called
    solved), mean turns, return and env errors; each generation's episode (turns, rewards, conversation)."""
    import torch

    from rlhf_cli.models import position_limit
    from rlhf_cli.training.evaluation import episode_accuracy, sampled_episode_accuracy

    env_cfg = dataclasses.replace(cfg.env, max_turns=cfg.env.max_turns or _from_run(manifest, "env.max_turns", None))
    limit = position_limit(str(ckpt)) or 1 << 30
    with torch.no_grad():
        metrics, _, episodes = episode_accuracy(engine, tokenizer, env_cls, rows, prompts, eval_cfg, env_cfg, device,
                                                limit)
        sampled, correct = (sampled_episode_accuracy(engine, tokenizer, env_cls, rows, prompts, eval_cfg, env_cfg,
                                                     device, limit, seed) if eval_cfg.samples else ({}, None))
    metrics |= sampled  # eval.samples=K: pass@1 and pass@k of K sampled episodes a row
    generations = [{"prompt": p, "response": e.texts[-1], "correct": e.solved is True, "episode": e.summary(),
                    **({"samples_correct": correct[i]} if correct else {})}
                   for i, (p, e) in enumerate(zip(prompts, episodes))]
    return {"checkpoint": str(ckpt), "stage": manifest.get("stage"), "data": source, "env": env_name,
            "rule": None, "reward_model": None, "max_new_tokens": eval_cfg.max_new_tokens, "memory": plan.describe(),
            **({"samples_per_prompt": eval_cfg.samples} if sampled else {}),
            "metrics": {"prompts": len(rows), **metrics}, "wall_time_s": round(time.time() - t0, 2),
            "samples": generations[:eval_cfg.show_samples], "generations": generations}


def _policy_manifest(ckpt: Path) -> dict:
    """The checkpoint's manifest ({} without one); a reward model's final/ is an error naming where it goes."""
    from rlhf_cli.training.checkpoint import read_manifest

    manifest = read_manifest(ckpt)
    if manifest.get("stage") == "train-rm":
        raise UserError(f"{ckpt} is a reward model (train-rm); evaluate a policy (an sft or rl final/) "
                        f"and pass this one as reward.model.path={ckpt}")
    return manifest


def _settings(cfg: EvalToolConfig, manifest: dict) -> tuple[int, int, int, object]:
    """(seed, data.num_eval, data.eval_limit, the eval settings): each key set here, else the run's own (its
    manifest), else the default."""
    seed = cfg.seed if cfg.seed is not None else _from_run(manifest, "seed", 0)
    num_eval = cfg.data.num_eval or _from_run(manifest, "data.num_eval", 200)
    eval_limit = cfg.data.eval_limit or _from_run(manifest, "data.eval_limit", 200)
    max_new_tokens = cfg.eval.max_new_tokens or _from_run(manifest, "eval.max_new_tokens", 40)
    return seed, num_eval, eval_limit, dataclasses.replace(cfg.eval, max_new_tokens=max_new_tokens)


def _reward_model_manifest(rm_path: str | None) -> dict:
    """reward.model.path's manifest ({} for none or a model without one), checked from its files before any
    weights load: a train-rm final/, a model directory, a reward model's kind."""
    from rlhf_cli.models import REWARD_MODEL, check_model_dir, check_model_kind
    from rlhf_cli.training.checkpoint import read_manifest

    if not rm_path:
        return {}
    rm_manifest = read_manifest(rm_path)
    if rm_manifest and rm_manifest.get("stage") != "train-rm":
        raise UserError(f"reward.model.path: {rm_path} is not a reward model (its manifest says stage "
                        f"{rm_manifest.get('stage')!r}); give a train-rm final/")
    check_model_dir(rm_path, "reward.model.path")
    check_model_kind(rm_path, "reward.model.path", REWARD_MODEL)
    return rm_manifest


def _generations(prompts, responses, checks, rm_scores, correct_samples) -> list[dict]:
    """One dict a prompt: its response, the rule's check, and the RM's score and the correct samples' count where
    they were measured (None: not)."""
    rows = []
    for i, (prompt, response, check) in enumerate(zip(prompts, responses, checks)):
        row = {"prompt": prompt, "response": response, "correct": check}
        if rm_scores:
            row["rm_score"] = rm_scores[i]
        if correct_samples is not None:
            row["samples_correct"] = correct_samples[i]
        rows.append(row)
    return rows


def _eval_rows(cfg: EvalToolConfig, seed: int, num_eval: int, limit: int, manifest: dict) -> tuple[list[dict], str]:
    """The first `limit` held-out rows (data.eval; for an rl run over episodes, unset, the run's own data.eval, the
    rows its environment reads; else the embedded task's held-out split) and where they came from."""
    from rlhf_cli import data

    if cfg.data.eval is None and not cfg.env.name and _from_run(manifest, "env.name", None):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval=_from_run(manifest, "data.eval", None)))
    if cfg.data.eval is None:
        rows = task.prompt_rows(num_eval, seed=seed, split="eval", n_eval=num_eval)
        return rows[:limit], f"embedded task held-out split (seed {seed}, {num_eval} rows)"
    return data.load_rows(cfg.data.eval, "data.eval", cfg.data.eval_split, cfg.data.subset)[:limit], cfg.data.eval


def _rm_scores(cfg: EvalToolConfig, rm_manifest: dict, prompts, responses, device, tokens: int,
               metrics: dict) -> list[float]:
    """The reward model's score of every (prompt, response); their mean (and, where the RM's manifest has its
    held-out statistics, the mean standardised as rl's reward is: (s - mean) / std) go into metrics."""
    from rlhf_cli.models import load_scalar_head_model, load_tokenizer
    from rlhf_cli.rewards.sources import ModelReward

    rm_path = cfg.reward.model.path
    rm_tokenizer = load_tokenizer(rm_path, "reward.model.path", cfg.model.trust_remote_code)
    rm = ModelReward(load_scalar_head_model(rm_path, "reward.model.path", cfg.model.dtype, device,
                                            cfg.model.trust_remote_code), rm_tokenizer, device, tokens=tokens,
                     batch_size=cfg.eval.batch_size)
    rm_scores = rm.score(prompts, responses, [{} for _ in prompts]).values.tolist()
    metrics["rm_score"] = sum(rm_scores) / len(rm_scores)
    if "score_std" in rm_manifest:
        mean, std = float(rm_manifest["score_mean"]), max(float(rm_manifest["score_std"]), 1e-6)
        metrics["rm_score_normalized"] = (metrics["rm_score"] - mean) / std
    return rm_scores


def _checks(rows, prompts, responses, rule: str) -> list[bool]:
    """Per-row verdicts of the rule (held_out_accuracy returns only the mean and a few samples)."""
    fn = import_reward_function(rule, "eval.rule")
    return [bool(call_reward(fn, rule, p, r, row)) for p, r, row in zip(prompts, responses, rows)]


def show(result: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    with_rm = any("rm_score" in g for g in result["samples"])
    samples = Table(title="sample generations (greedy)", show_lines=True)
    for col in ("prompt", "response", "check") + (("rm score",) if with_rm else ()):
        samples.add_column(col)
    for g in result["samples"]:
        check = "" if g["correct"] is None else ("right" if g["correct"] else "wrong")
        response = transcript(g["episode"]) if "episode" in g else g["response"]
        samples.add_row(escape(g["prompt"].strip()), escape(response.strip()), check,
                        *((fmt_value(g["rm_score"]),) if with_rm else ()))
    if result["samples"]:
        console.print(samples)
    table = Table(title=escape(f"rlhf eval {result['checkpoint']}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {"prompts": "held-out prompts", "accuracy": "accuracy (eval.rule)", "rm_score": "reward-model score",
             "rm_score_normalized": "reward-model score, normalised", "response_chars": "mean response length (chars)",
             "response_tokens": "mean response length (tokens)"}
    for key, value in result["metrics"].items():
        table.add_row(escape(names.get(key, key)), fmt_value(value))
    table.add_row("data", escape(str(result["data"])))
    if result.get("memory"):
        table.add_row("memory", escape(result["memory"]))
    if result.get("env"):
        table.add_row("environment", escape(result["env"]))
    else:
        table.add_row("eval.rule", escape(str(result["rule"])) if result["rule"] else "none")
    if result["rule"] is None and not result.get("env"):
        table.add_row("accuracy", "n/a (no eval.rule, or rows without an answer column)")
    console.print(table)
