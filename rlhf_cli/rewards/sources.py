"""Reward sources as one list: rule functions, process rewards and reward models, each scoring a batch of
responses into one tensor. `rl` (and its async actors), `rlhf label` and `rlhf eval` all score through it.

    sources = rule_sources(cfg.reward.functions, cfg.reward.function_weight) + [ModelReward(rm, tokenizer, ...)]
    scored = [source.score(prompts, responses, rows) for source in sources]   # one SourceScores a source
    total = sum(source.weight * s.values for source, s in zip(sources, scored))

A source has a `name`, a `weight` and `score(prompts, responses, rows) -> SourceScores`: its (B,) values,
unweighted, and the process rewards (per response, `(end_char, value)` pairs, one per reasoning step) that
make up some of them. The RL step places weight x each step value on the token holding the step's last
character, and adds weight x each outcome value to the sequence score (rollout_side.RolloutSide.reward_rows).
A new kind of source is a class with those three members.

Each source's mean is logged (`score_stat_names`): `rule_reward` (the rule functions' sum, unweighted),
`reward/<function>` for each of two or more rule functions, `rm_score` (the reward model, normalised).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from rlhf_cli.models.scoring import score_texts
from rlhf_cli.rewards import call_reward, import_reward_function


@dataclass
class SourceScores:
    """One source's rewards of B responses, unweighted."""
    values: torch.Tensor  # (B,) each response's reward; process rewards summed over its steps
    outcome: torch.Tensor  # (B,) the outcome rewards (0 where a response's reward came as steps)
    steps: list[list[tuple[int, float]]] = field(default_factory=list)  # per response: (end_char, value) pairs


class RewardSource(Protocol):
    name: str
    weight: float

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> SourceScores: ...


@dataclass
class RuleReward:
    """A function by dotted path, `f(prompt, response, **row)` -> a float (a verifiable reward) or a list of
    `(end_char, value)` pairs (process rewards); rewards.call_reward checks what it returns."""
    name: str  # 'module:function'
    fn: Callable
    weight: float = 1.0

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> SourceScores:
        """Values in float64, each the function's float (or its steps' Python sum) exactly."""
        outcome, steps = [], []
        for prompt, response, row in zip(prompts, responses, rows):
            value = call_reward(self.fn, self.name, prompt, response, row)
            outcome.append(0.0 if isinstance(value, list) else value)
            steps.append(value if isinstance(value, list) else [])
        values = [o + sum(v for _, v in s) for o, s in zip(outcome, steps)]  # one of the two is 0
        return SourceScores(torch.tensor(values, dtype=torch.float64), torch.tensor(outcome, dtype=torch.float64),
                            steps)


def rule_sources(functions: list[str], weight: float = 1.0, key: str = "reward.functions") -> list[RuleReward]:
    """One RuleReward per dotted path, imported now (a bad path is one error line naming `key`)."""
    return [RuleReward(name, import_reward_function(name, key), weight) for name in functions]


@dataclass
class ModelReward:
    """A reward model's score of prompt + response read at the last token (scoring.score_texts: the sequences
    train-rm trained on), standardised as (score - mean) / std (its manifest's held-out statistics; 0 / 1 raw)."""
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    weight: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    tokens: int | None = None  # a memory plan's token budget per forward (else batch_size rows)
    batch_size: int = 64
    name: str = "reward model"

    def score(self, prompts: list[str], responses: list[str], rows: list[dict]) -> SourceScores:
        """Values in float32, as the model scores."""
        values = (score_texts(self.model, self.tokenizer, prompts, responses, self.device, self.batch_size,
                              tokens=self.tokens) - self.mean) / self.std
        return SourceScores(values, values, [[] for _ in prompts])


def score_stat_names(reward_cfg) -> tuple[str, ...]:
    """The per-row stats an RL step logs the means of, from the reward config alone, in order: what an async
    actor's batch carries to its learner."""
    functions = list(reward_cfg.functions)
    return (("rule_reward",) if functions else ()) + (
        tuple(f"reward/{name}" for name in functions) if len(functions) > 1 else ()) + (
        ("rm_score",) if reward_cfg.model.path else ()) + (("overlong_penalty",) if reward_cfg.overlong_buffer else ())


def source_stats(sources: list, scored: list[SourceScores]) -> dict:
    """name in score_stat_names -> (B,) float32 per-row values (the overlong penalty is not a source's)."""
    rules = [(s, out) for s, out in zip(sources, scored) if isinstance(s, RuleReward)]
    stats = {"rule_reward": sum(out.values for _, out in rules).float()} if rules else {}
    if len(rules) > 1:
        stats |= {f"reward/{s.name}": out.values.float() for s, out in rules}
    stats |= {"rm_score": out.values.float() for s, out in zip(sources, scored) if isinstance(s, ModelReward)}
    return stats
