"""Advantage estimators against brute-force loops and hand-computed baselines."""

import pytest
import torch

from rlhf_cli.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    BASELINES,
    discounted_returns,
    gae,
    nstep_advantages,
    reinforce_advantages,
)
from rlhf_cli.algorithms.core import RunningMean


def ragged_batch(seed, batch_size=5, num_tokens=7):
    """Random rewards/values with garbage on padding, and a prefix mask with lengths >= 1."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, num_tokens + 1, (batch_size,), generator=generator)
    lengths[0] = num_tokens  # one full row
    mask = torch.arange(num_tokens)[None, :] < lengths[:, None]
    rewards = torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    values = torch.randn(batch_size, num_tokens, generator=generator, dtype=torch.float64)
    rewards = torch.where(mask, rewards, torch.full_like(rewards, 1e4))
    values = torch.where(mask, values, torch.full_like(values, -1e4))
    return rewards, values, mask, lengths.tolist()


def brute_returns(rewards, lengths, gamma):
    out = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        for t in range(length):
            out[b, t] = sum(gamma ** (k - t) * rewards[b, k].item() for k in range(t, length))
    return out


def brute_gae(rewards, values, lengths, gamma, lam):
    advantages = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        value = lambda k: values[b, k].item() if k < length else 0.0  # noqa: E731
        for t in range(length):
            total = 0.0
            for k in range(t, length):
                delta = rewards[b, k].item() + gamma * value(k + 1) - value(k)
                total += (gamma * lam) ** (k - t) * delta
            advantages[b, t] = total
    return advantages


def brute_nstep(rewards, values, lengths, gamma, n):
    returns = torch.zeros_like(rewards)
    for b, length in enumerate(lengths):
        for t in range(length):
            total = sum(gamma**k * rewards[b, t + k].item() for k in range(n) if t + k < length)
            if t + n < length:
                total += gamma**n * values[b, t + n].item()
            returns[b, t] = total
    return returns


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_brute_force(gamma):
    rewards, _, mask, lengths = ragged_batch(0)
    returns = discounted_returns(rewards, mask, gamma)
    torch.testing.assert_close(returns, brute_returns(rewards, lengths, gamma))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_brute_force(gamma, lam):
    rewards, values, mask, lengths = ragged_batch(1)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, brute_gae(rewards, values, lengths, gamma, lam))
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
    # returns are taken before whitening: exactly A + V on real tokens
    assert torch.equal(returns[mask], (advantages + values)[mask])


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    rewards, values, mask, lengths = ragged_batch(2)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, brute_returns(rewards, lengths, 1.0))


def test_gae_detaches_inputs():
    values = torch.zeros(2, 3, requires_grad=True)
    advantages, returns = gae(torch.ones(2, 3), values, torch.ones(2, 3), gamma=1.0, lam=0.95)
    assert not advantages.requires_grad and not returns.requires_grad


@pytest.mark.parametrize("gamma,n", [(1.0, 1), (0.9, 2), (0.99, 3), (0.8, 6)])
def test_nstep_brute_force(gamma, n):
    rewards, values, mask, lengths = ragged_batch(3)
    advantages, returns = nstep_advantages(rewards, values, mask, gamma=gamma, nstep=n)
    torch.testing.assert_close(returns, brute_nstep(rewards, values, lengths, gamma, n))
    expected_advantages = torch.where(mask, returns - values, torch.zeros_like(values))
    torch.testing.assert_close(advantages, expected_advantages)
    assert torch.all(advantages[~mask] == 0)


@pytest.mark.parametrize("n", [7, 8, 100])
def test_nstep_long_horizon_equals_gae_lambda_one(n):
    rewards, values, mask, _ = ragged_batch(4)
    nstep = nstep_advantages(rewards, values, mask, gamma=0.9, nstep=n)
    full = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(nstep[0], full[0])
    torch.testing.assert_close(nstep[1], full[1])


def test_nstep_one_equals_gae_lambda_zero():
    rewards, values, mask, _ = ragged_batch(5)
    torch.testing.assert_close(nstep_advantages(rewards, values, mask, gamma=0.9, nstep=1)[0], gae(rewards, values, mask, gamma=0.9, lam=0.0)[0])


def scores_at_last_token(scores, lengths, num_tokens=3):
    """Rewards with only the score at the last real token, so G[b, t] = s_b with gamma = 1."""
    rewards = torch.zeros(len(scores), num_tokens)
    for b, length in enumerate(lengths):
        rewards[b, length - 1] = scores[b]
    mask = torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]
    return rewards, mask


def broadcast(per_row, mask):
    return torch.tensor(per_row)[:, None] * mask


def test_baseline_none():
    rewards, mask = scores_at_last_token([1.0, 2.0, 3.0, 6.0], [3, 2, 1, 3])
    advantages, returns = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="none", group_size=2)
    torch.testing.assert_close(advantages, broadcast([1.0, 2.0, 3.0, 6.0], mask))
    torch.testing.assert_close(returns, advantages)


def test_baseline_rloo_hand_values():
    rewards, mask = scores_at_last_token([1.0, 2.0, 3.0, 6.0], [3, 2, 1, 3])
    advantages, returns = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=2)
    torch.testing.assert_close(advantages, broadcast([-1.0, 1.0, -3.0, 3.0], mask))
    torch.testing.assert_close(returns, broadcast([1.0, 2.0, 3.0, 6.0], mask))


def test_baseline_rloo_group_of_three():
    rewards, mask = scores_at_last_token([0.0, 3.0, 6.0], [1, 2, 3])
    advantages, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=3)
    # baselines: mean(3,6)=4.5, mean(0,6)=3, mean(0,3)=1.5
    torch.testing.assert_close(advantages, broadcast([-4.5, 0.0, 4.5], mask))


def test_baseline_rloo_per_token_uses_return_to_go():
    rewards = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    mask = torch.ones(2, 2)
    advantages, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=2)
    # G = [[3, 2], [4, 4]]; s = [3, 4]; baselines [4, 3]
    torch.testing.assert_close(advantages, torch.tensor([[-1.0, -2.0], [1.0, 1.0]]))


def test_baseline_rloo_position_is_rloo_for_outcome_rewards_of_any_length():
    rewards, mask = scores_at_last_token([1.0, 2.0, 3.0, 6.0, 0.0, 5.0], [3, 2, 1, 3, 2, 2])
    for K in (2, 3):
        ours, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo_position", group_size=K)
        rloo, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=K)
        torch.testing.assert_close(ours, rloo)


def test_baseline_rloo_position_hand_values_with_step_rewards():
    """Two samples, process rewards: each position's baseline is the other's reward from that position on (past
    its end: what its last token earned), where rloo subtracts the other's whole return from every token."""
    rewards = torch.tensor([[0.2, 0.0, 0.2, 1.0],     # steps at 0 and 2, the answer at 3: G = [1.4, 1.2, 1.2, 1.0]
                            [0.2, -0.2, 0.0, 0.0]])   # steps at 0 and 1, stops at 1:     G = [0.0, -0.2, 0, 0]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ours, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo_position", group_size=2)
    # baselines: row 0 from row 1's Ĝ = [0.0, -0.2, -0.2, -0.2]; row 1 from row 0's G = [1.4, 1.2]
    torch.testing.assert_close(ours, torch.tensor([[1.4, 1.4, 1.4, 1.2], [-1.4, -1.4, 0.0, 0.0]]))
    rloo, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=2)
    torch.testing.assert_close(rloo, torch.tensor([[1.4, 1.2, 1.2, 1.0], [-1.4, -1.6, 0.0, 0.0]]))


def test_baseline_rloo_position_centres_the_advantage_at_every_position():
    """Exchangeable samples: the others' return-to-go from a position has the same mean as one's own, so the mean
    advantage is ~0 at every position (rloo's is not: a late token's return-to-go is set against whole returns)."""
    g = torch.Generator().manual_seed(0)
    B, T, K = 4000, 6, 4
    rewards = (torch.rand(B, T, generator=g) < 0.3).float() * 0.2
    mask = torch.ones(B, T)
    ours, returns = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo_position", group_size=K)
    assert ours.mean(0).abs().max() < 0.02, ours.mean(0)
    rloo, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=K)
    assert rloo.mean(0)[-1] < -0.2  # the last token: its own reward against the others' whole return


def test_baseline_group_norm_hand_values():
    rewards, mask = scores_at_last_token([1.0, 3.0, 2.0, 2.0], [3, 2, 1, 3])
    advantages, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="group_norm", group_size=2)
    # group 1: mean 2, population std 1 -> [-1, 1] (/(1 + eps), eps = GROUP_STD_EPS = 1e-6); group 2: all equal -> 0
    expected = broadcast([-1.0 / (1 + 1e-6), 1.0 / (1 + 1e-6), 0.0, 0.0], mask)
    torch.testing.assert_close(advantages, expected)


def test_group_norm_normalises_only_the_scores_when_given():
    """KL shaping with equal scores in a group: without `scores` the tiny std of the KL
    differences blows advantages up; with them A = return-to-go of (KL part + normalised score)."""
    beta_kl = torch.tensor([[-0.01, -0.02, 0.0], [-0.03, 0.0, 0.0], [0.0, -0.01, -0.01], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    scores = torch.tensor([1.0, 1.0, 0.0, 2.0])
    lengths = mask.sum(-1)
    rewards = beta_kl.clone()
    rewards[torch.arange(4), lengths - 1] += scores
    blown, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="group_norm", group_size=2)
    assert blown[0].abs().max() > 100  # the failure mode: 0.03 of KL divided by a std of 0.0
    advantages, returns = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="group_norm", group_size=2, scores=scores)
    # group 1: equal scores -> normalised 0; A = KL return-to-go only
    torch.testing.assert_close(advantages[0], torch.tensor([-0.03, -0.02, 0.0]))
    torch.testing.assert_close(advantages[1], torch.tensor([-0.03, 0.0, 0.0]))
    # group 2: scores 0 and 2 -> mean 1, std 1 -> -1 and +1 (up to eps), plus the KL return-to-go
    torch.testing.assert_close(advantages[2], torch.tensor([-0.02, -0.02, -0.01]) - 1 / (1 + 1e-6))
    torch.testing.assert_close(advantages[3], torch.tensor([0.0, 0.0, 0.0]) + 1 / (1 + 1e-6))
    # returns stay the plain return-to-go; with no shaping the two forms agree
    torch.testing.assert_close(returns, discounted_returns(rewards, mask, 1.0))
    plain, mask2 = scores_at_last_token([1.0, 3.0, 2.0, 2.0], [3, 2, 1, 3])
    torch.testing.assert_close(
        reinforce_advantages(plain, None, mask2, gamma=1.0, baseline="group_norm", group_size=2, scores=torch.tensor([1.0, 3.0, 2.0, 2.0]))[0],
        reinforce_advantages(plain, None, mask2, gamma=1.0, baseline="group_norm", group_size=2)[0])


def test_baseline_running_mean():
    running_mean = RunningMean()
    rewards, mask = scores_at_last_token([1.0, 3.0], [3, 2])
    # first batch: baseline = mean of this batch = 2
    advantages, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="mean", group_size=1, running_mean=running_mean)
    torch.testing.assert_close(advantages, broadcast([-1.0, 1.0], mask))
    assert (running_mean.value, running_mean.count) == (2.0, 2)
    # second batch uses the past mean (2), then folds in [6, 8] -> mean of [1, 3, 6, 8] = 4.5
    rewards, mask = scores_at_last_token([6.0, 8.0], [1, 3])
    advantages, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="mean", group_size=1, running_mean=running_mean)
    torch.testing.assert_close(advantages, broadcast([4.0, 6.0], mask))
    assert (running_mean.value, running_mean.count) == (4.5, 4)


def test_baseline_errors():
    rewards, mask = scores_at_last_token([1.0, 2.0, 3.0], [1, 2, 3])
    with pytest.raises(ValueError, match="group_size >= 2"):
        reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=1)
    with pytest.raises(ValueError, match="not divisible"):
        reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=2)
    with pytest.raises(ValueError, match="RunningMean"):
        reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="mean", group_size=1)
    with pytest.raises(ValueError, match="unknown algorithm.baseline .median.; valid: group_mean, group_norm, "):
        reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="median", group_size=1)


def test_reinforce_zero_on_padding_with_garbage():
    rewards, _, mask, _ = ragged_batch(6, batch_size=6)
    for baseline in BASELINES:
        advantages, returns = reinforce_advantages(
            rewards, None, mask, gamma=0.95, baseline=baseline, group_size=3, running_mean=RunningMean()
        )
        assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)
        assert advantages.abs().max() < 1e3


def test_registry():
    assert set(ADVANTAGE_ESTIMATORS) == {"reinforce", "gae", "nstep"}
    assert ADVANTAGE_ESTIMATORS.get("gae") is gae
    assert [ADVANTAGE_ESTIMATORS.trait(n, "needs_values") for n in ("reinforce", "gae", "nstep")] == [False, True, True]
    with pytest.raises(ValueError, match="valid: gae, nstep, reinforce"):
        ADVANTAGE_ESTIMATORS.get("vtrace")
