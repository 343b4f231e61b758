"""Reward sources as one list (rlhf_cli/rewards/sources.py): each source scores a batch into one tensor, the
logged stats are named from the config alone, and an async actor's batch carries exactly those stats.

    .venv/bin/pytest -q tests/test_reward_sources.py
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from rlhf_cli.engines.rollout import Rollout
from rlhf_cli.rewards.sources import (ModelReward, RuleReward, SourceScores, rule_sources, score_stat_names,
                                     source_stats)
from rlhf_cli.rl.actors import pack, payload_size, unpack
from rlhf_cli.rl.rollout_side import Rewarded


def outcome(prompt, response, **row):
    return float(response == row["answer"])


def steps(prompt, response, **row):
    """One process reward per line: 0.5 for a line holding a digit, -0.25 for one without."""
    out, end = [], 0
    for line in response.split("\n"):
        end += len(line) + 1
        out.append((end - 1, 0.5 if any(c.isdigit() for c in line) else -0.25))
    return out


def test_a_rule_source_gives_one_tensor_with_outcomes_and_steps_apart():
    prompts, responses = ["p", "p", "q"], ["7", "x", "1\nno"]
    rows = [{"answer": "7"}, {"answer": "7"}, {"answer": "1"}]
    out = RuleReward("m:outcome", outcome, weight=2.0).score(prompts, responses, rows)
    assert out.values.tolist() == [1.0, 0.0, 0.0] and out.outcome.tolist() == [1.0, 0.0, 0.0]
    assert out.steps == [[], [], []]
    out = RuleReward("m:steps", steps).score(prompts, responses, rows)
    assert out.steps == [[(1, 0.5)], [(1, -0.25)], [(1, 0.5), (4, -0.25)]]
    assert out.values.tolist() == [0.5, -0.25, 0.25]  # each response's steps summed
    assert out.outcome.tolist() == [0.0, 0.0, 0.0]  # process rewards are not outcome rewards


def test_rule_sources_import_by_dotted_path_and_name_a_bad_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "m_rewards", SimpleNamespace(outcome=outcome))
    [source] = rule_sources(["m_rewards:outcome"], weight=0.5)
    assert source.fn is outcome and source.weight == 0.5 and source.name == "m_rewards:outcome"
    from rlhf_cli.errors import UserError

    with pytest.raises(UserError, match="eval.rule: 'm_rewards' has no function 'nope'"):
        rule_sources(["m_rewards:nope"], key="eval.rule")


@pytest.mark.parametrize("functions, model, overlong", [
    ([], "rm", 0), (["a:f"], None, 0), (["a:f", "b:g"], "rm", 4), (["a:f", "b:g", "c:h"], None, 2)])
def test_the_stats_the_sources_give_are_the_names_the_config_gives(functions, model, overlong):
    """What an actor packs and its learner unpacks is named from the config alone: it must be exactly what
    the sources' stats hold (plus the overlong penalty, which is no source's)."""
    cfg = SimpleNamespace(functions=functions, model=SimpleNamespace(path=model), overlong_buffer=overlong)
    sources = [RuleReward(name, outcome) for name in functions]
    scored = [s.score(["p"] * 3, ["7", "x", "7"], [{"answer": "7"}] * 3) for s in sources]
    if model:  # a reward model among the sources (its scores as ModelReward.score gives them, no model loaded)
        rm = torch.tensor([0.1, -0.2, 0.3])
        sources, scored = sources + [ModelReward(None, None, "cpu")], scored + [SourceScores(rm, rm, [[]] * 3)]
    stats = source_stats(sources, scored)
    if overlong:
        stats["overlong_penalty"] = torch.zeros(3)
    assert tuple(stats) == score_stat_names(cfg)
    if len(functions) > 1:  # each rule's own mean, and their sum
        assert torch.equal(stats["rule_reward"], sum(stats[f"reward/{n}"] for n in functions))


def test_an_actor_batch_round_trips_with_its_stats():
    B, P, T = 3, 2, 4
    g = torch.Generator().manual_seed(0)
    rollout = Rollout(torch.randint(0, 50, (B, P), generator=g), torch.ones(B, P, dtype=torch.long),
                      torch.randint(0, 50, (B, T), generator=g), torch.ones(B, T), -torch.rand(B, T, generator=g),
                      torch.tensor([True, False, True]))
    names = ("rule_reward", "reward/a:f", "reward/b:g", "rm_score")
    rewarded = Rewarded(torch.rand(B, generator=g), torch.rand(B, T, generator=g),
                        {k: torch.rand(B, generator=g) for k in names})
    ref, behaviour = -torch.rand(B, T, generator=g), -torch.rand(B, T, generator=g)
    payload = pack(rollout, rewarded, ref, behaviour, "cpu", names)
    assert payload.numel() == payload_size(B, P, T, len(names))
    got = unpack(payload, B, P, T, 7, names)
    assert torch.equal(got.rollout.response_ids, rollout.response_ids) and got.version == 7
    assert torch.equal(got.rewarded.scores, rewarded.scores)
    assert list(got.rewarded.row_stats) == list(names)
    assert all(torch.equal(got.rewarded.row_stats[k], rewarded.row_stats[k]) for k in names)
    assert torch.equal(got.logprobs_ref, ref) and torch.equal(got.logprobs_behaviour, behaviour)
