"""Held-out evaluation: greedy responses from a rollout engine, checked by a rule (the task's by default)."""

from __future__ import annotations

from rlhf_cli.data import cut_left, encode_prompt, left_pad
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.rollout import RolloutEngine, SamplingParams, decode_responses


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
    rule = eval_cfg.rule
    if rule == DEFAULT_RULE and not all("answer" in r for r in rows):
        rule = None
    checks = []
    if rule:
        fn = import_reward_function(rule, "eval.rule")
        checks = [call_reward(fn, rule, p, resp, r) for p, resp, r in zip(prompts, responses, rows)]
    accuracy = sum(checks) / len(checks) if checks else None
    samples = [(p, resp, ("right" if c else "wrong") if checks else "")
               for p, resp, c in zip(prompts, responses, checks or [None] * len(prompts))][: eval_cfg.show_samples]
    mean_len = sum(len(r) for r in responses) / max(1, len(responses))
    return accuracy, samples, mean_len, responses
