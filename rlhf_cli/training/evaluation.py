"""Held-out evaluation: greedy responses from a rollout engine, checked by a rule (the task's by default);
with eval.samples=K also K sampled responses per prompt: pass@1, pass@k (Chen et al. 2021) and maj@k."""

from __future__ import annotations

import math
from collections import Counter

from rlhf_cli.data import cut_left, encode_prompt, left_pad
from rlhf_cli.engines.episodes import episode_stats, run_episodes
from rlhf_cli.envs import transcript
from rlhf_cli.engines.rollout import RolloutEngine, SamplingParams, decode_responses
from rlhf_cli.reasoning import answer_key
from rlhf_cli.rewards import call_reward, import_reward_function

EVAL_NOISE_STEP = 1_000_000  # the noise of evaluation samples: keyed apart from every training step

def generate_texts(engine: RolloutEngine, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                   device, max_sequence: int | None = None) -> list[str]:
    """Greedy completions of prompt texts, `batch_size` prompts per generate call; with max_sequence, a
    prompt is cut from the left so that prompt + response fit in it (policy.max_length, the positions)."""
    texts = []
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    room = max(1, max_sequence - max_new_tokens) if max_sequence else None
    for i in range(0, len(prompts), batch_size):
        encoded = [encode_prompt(tokenizer, p) for p in prompts[i:i + batch_size]]
        ids, mask = left_pad([cut_left(e, room, tokenizer) if room else e for e in encoded], tokenizer.pad_token_id)
        texts.extend(decode_responses(tokenizer, engine.generate(ids.to(device), mask.to(device), params)))
    return texts


DEFAULT_RULE = "rlhf_cli.task:correctness_reward"


def held_out_accuracy(engine: RolloutEngine, tokenizer, rows: list[dict], prompts: list[str], eval_cfg, device,
                      max_sequence: int | None = None
                      ) -> tuple[float | None, list[tuple[str, str, str]], float, list[str]]:
    """Greedy generation by `engine` (rollout.py) on held-out prompts checked by eval.rule (the task's rule
    by default).

    Returns (accuracy, or None when there is no rule or the default rule has no
    `answer` column to check; sample rows; mean response chars; the responses).
    """
    responses = generate_texts(engine, tokenizer, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, device,
                               max_sequence)
    rule = effective_rule(eval_cfg.rule, rows)
    checks = []
    if rule:
        fn = import_reward_function(rule, "eval.rule")
        checks = [call_reward(fn, rule, p, resp, r) for p, resp, r in zip(prompts, responses, rows)]
    accuracy = sum(checks) / len(checks) if checks else None
    samples = [(p, resp, ("right" if c else "wrong") if checks else "")
               for p, resp, c in zip(prompts, responses, checks or [None] * len(prompts))][: eval_cfg.show_samples]
    mean_len = sum(len(r) for r in responses) / max(1, len(responses))
    return accuracy, samples, mean_len, responses


def episode_accuracy(engine: RolloutEngine, tokenizer, env_cls, rows: list[dict], prompts: list[str], eval_cfg,
                     env_cfg, device, max_sequence: int, noise: tuple[int, int] | None = None
                     ) -> tuple[dict[str, float], list[tuple[str, str, str]], list]:
    """Held-out episodes against env_cls (greedy; noise=(seed, step): sampled at temperature eval.temperature),
    eval.batch_size a generate call -> ({"accuracy": the share the environment called solved, "turns",
    "env_return", "env_errors": means}, sample rows (prompt, transcript, right/wrong), the episodes)."""
    room = max(1, max_sequence - eval_cfg.max_new_tokens)
    episodes = []
    for i in range(0, len(prompts), eval_cfg.batch_size):
        ids = [cut_left(encode_prompt(tokenizer, p), room, tokenizer) for p in prompts[i:i + eval_cfg.batch_size]]
        params = (SamplingParams(eval_cfg.max_new_tokens, greedy=True) if noise is None else
                  SamplingParams(eval_cfg.max_new_tokens, eval_cfg.temperature, noise_key=(*noise, i)))
        episodes += run_episodes(engine, tokenizer, env_cls, rows[i:i + eval_cfg.batch_size], ids, params,
                                 env_cfg.turns(env_cls), max_sequence, env_cfg.timeout_s, device).episodes
    stats = {k: float(v.mean()) for k, v in episode_stats(episodes).items()}
    metrics = {"accuracy": stats.pop("solved"), **stats}
    samples = [(p, transcript(e.summary()), "right" if e.solved else "wrong")
               for p, e in zip(prompts, episodes)][:eval_cfg.show_samples]
    return metrics, samples, episodes


def sampled_episode_accuracy(engine: RolloutEngine, tokenizer, env_cls, rows: list[dict], prompts: list[str],
                             eval_cfg, env_cfg, device, max_sequence: int, seed: int) -> tuple[dict[str, float], list]:
    """K = eval.samples episodes a held-out row at eval.temperature (noise keyed apart from training) ->
    ({"pass@1": .., "pass@k": .. for k in eval.pass_k}, solved episodes per row), pass@k by :func:`pass_at_k`
    over the environment's verdicts."""
    K = eval_cfg.samples
    _, _, episodes = episode_accuracy(engine, tokenizer, env_cls, [r for r in rows for _ in range(K)],
                                      [p for p in prompts for _ in range(K)], eval_cfg, env_cfg, device, max_sequence,
                                      noise=(seed, EVAL_NOISE_STEP))
    correct = [sum(e.solved is True for e in episodes[i * K:(i + 1) * K]) for i in range(len(rows))]
    return {f"pass@{k}": sum(pass_at_k(K, c, k) for c in correct) / max(1, len(correct))
            for k in sorted({1, *eval_cfg.pass_k})}, correct


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples, c of them correct (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1): the chance that k of the n, drawn without replacement, hold
    at least one correct.

    Formula: ``1 - C(n - c, k) / C(n, k)`` (1 when ``n - c < k``); pass@1 is ``c / n``. Exact integers,
    so no overflow for any n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(responses: list[str], checks: list[bool]) -> bool:
    """maj@k of one prompt: is the most frequent final answer among ``responses`` right?

    Answers are grouped by :func:`rlhf_cli.reasoning.answer_key` (``0.5`` and ``1/2`` vote together);
    responses without a readable answer do not vote; a tie goes to the answer seen first. The winning
    answer is right when the rule judged its first response right (so any 0/1 rule works). No votes:
    wrong (Wang et al. 2023, "Self-Consistency", majority vote over sampled reasoning paths).
    """
    keys = [answer_key(r) for r in responses]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)  # first seen among the tied
    return bool(checks[keys.index(winner)])


def sampled_accuracy(engine: RolloutEngine, tokenizer, rows: list[dict], prompts: list[str], eval_cfg, device,
                     rule: str, seed: int, max_sequence: int | None = None) -> tuple[dict[str, float], list[int]]:
    """K = eval.samples responses per prompt at eval.temperature, checked by `rule`.

    Returns ``({"pass@1": .., "pass@k": .., "maj@k": .. for k in eval.pass_k}, correct samples per prompt)``:
    pass@k averaged over prompts by :func:`pass_at_k`, maj@k the share of prompts whose first k samples'
    majority answer is right (:func:`majority_correct`). Noise is keyed by (seed, row), so a rerun draws
    the same samples. Rows per generate call: at most eval.batch_size (whole prompts' K samples). Prompts are
    cut to fit max_sequence as in :func:`generate_texts`.
    """
    K = eval_cfg.samples
    fn = import_reward_function(rule, "eval.rule")
    per_call = max(1, eval_cfg.batch_size // K)  # prompts per generate call
    room = max(1, max_sequence - eval_cfg.max_new_tokens) if max_sequence else None
    correct, metrics = [], {}
    majority = {k: 0 for k in eval_cfg.pass_k}
    for i in range(0, len(prompts), per_call):
        chunk = prompts[i:i + per_call]
        encoded = [encode_prompt(tokenizer, p) for p in chunk]
        encoded = [cut_left(e, room, tokenizer) if room else e for e in encoded]
        ids, mask = left_pad([e for e in encoded for _ in range(K)], tokenizer.pad_token_id)
        params = SamplingParams(max_new_tokens=eval_cfg.max_new_tokens, temperature=eval_cfg.temperature,
                                noise_key=(seed, EVAL_NOISE_STEP, i * K))
        texts = decode_responses(tokenizer, engine.generate(ids.to(device), mask.to(device), params))
        for j, (prompt, row) in enumerate(zip(chunk, rows[i:i + per_call])):
            samples = texts[j * K:(j + 1) * K]
            checks = [bool(call_reward(fn, rule, prompt, text, row)) for text in samples]
            correct.append(sum(checks))
            for k in majority:
                majority[k] += majority_correct(samples[:k], checks[:k])
    for k in sorted({1, *eval_cfg.pass_k}):
        metrics[f"pass@{k}"] = sum(pass_at_k(K, c, k) for c in correct) / max(1, len(correct))
    for k in sorted(majority):
        metrics[f"maj@{k}"] = majority[k] / max(1, len(correct))
    return metrics, correct


def effective_rule(rule: str | None, rows: list[dict]) -> str | None:
    """eval.rule, or None when it is the task's default rule and the rows have no `answer` column to check."""
    return None if rule == DEFAULT_RULE and not all("answer" in r for r in rows) else rule


def stage_sampled_metrics(engine: RolloutEngine, tokenizer, rows: list[dict], prompts: list[str], eval_cfg, device,
                          seed: int, max_sequence: int | None = None) -> dict[str, float]:
    """The stages' held-out evaluation with eval.samples=K: ``{"eval_pass@1": .., "eval_pass@k": ..,
    "eval_maj@k": ..}``; empty when eval.samples is 0 or there is no rule to check (see :func:`held_out_accuracy`)."""
    rule = effective_rule(eval_cfg.rule, rows)
    if not eval_cfg.samples or not rule:
        return {}
    metrics, _ = sampled_accuracy(engine, tokenizer, rows, prompts, eval_cfg, device, rule, seed, max_sequence)
    return {f"eval_{k}": v for k, v in metrics.items()}
