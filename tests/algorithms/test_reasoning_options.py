"""The reasoning-RL options (issue 20): loss aggregation, group baselines, PPO dual clip, KL estimators k2 and
k3_clamped. Hand-computed values first; then equality with verl's formulas on random tensors.

The verl references below are transcriptions of verl's ``verl/trainer/ppo/core_algos.py`` at commit
b178a3cd56f58b2d502255daba591e92833930a7 (2026-01-29), not imports (verl is not a dependency). Each one's
docstring names the function and lines it mirrors.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from rlhf_cli.algorithms import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    aggregate,
    discounted_returns,
    group_norm,
    group_norm_unbiased,
    kl_k2,
    kl_k3,
    kl_k3_clamped,
    local_units,
    overlong_penalty,
    policy_gradient_loss,
    ppo_policy_loss,
    rank_share,
    reinforce_advantages,
    token_rewards,
)

# two responses: 3 real tokens and 1 real token
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])  # 99: padding, must not count


# ---------------------------------------------------------------- loss aggregation, by hand
@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),                    # 2.5
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),  # (2 + 4) / 2 = 3
    ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),           # 5
])
def test_loss_aggregations_by_hand(mode, expected):
    assert aggregate(LOSS, MASK, loss_agg=mode).item() == pytest.approx(expected)


def test_dr_grpo_normaliser_is_a_constant_not_the_row_length():
    # (6 + 4) / (2 rows * 10 tokens) = 0.5, whatever the padded width T = 3
    assert aggregate(LOSS, MASK, loss_agg="seq-mean-token-sum-norm", max_new_tokens=10).item() == pytest.approx(0.5)
    # without a limit it falls back to the padded width: 10 / (2 * 3)
    assert aggregate(LOSS, MASK, loss_agg="seq-mean-token-sum-norm").item() == pytest.approx(10 / 6)
    # the gradient of every real token is the same 1 / (B * L_max), short response or long
    loss_mat = LOSS.clone().requires_grad_()
    aggregate(loss_mat, MASK, loss_agg="seq-mean-token-sum-norm", max_new_tokens=10).backward()
    torch.testing.assert_close(loss_mat.grad, MASK / 20)


def test_seq_mean_token_mean_weighs_a_short_responses_token_more():
    """GRPO's length bias, the reason for the other modes: a token of the 1-token response gets 1/2,
    a token of the 3-token response 1/6 (token-mean: 1/4 each)."""
    loss_mat = LOSS.clone().requires_grad_()
    aggregate(loss_mat, MASK, loss_agg="seq-mean-token-mean").backward()
    torch.testing.assert_close(loss_mat.grad, torch.tensor([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0.0, 0.0]]))


def test_policy_losses_aggregate_by_the_configured_mode():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -7.0, -7.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    # -A * logp = [[1, 2, 3], [1, .., ..]]: seq-mean-token-mean = (2 + 1) / 2
    loss, _ = policy_gradient_loss(logprobs, None, advantages, MASK, loss_agg="seq-mean-token-mean")
    assert loss.item() == pytest.approx(1.5)
    # PPO on-policy (ratio 1) equals the same aggregation of -A: seq-mean-token-sum = (-3 - 2) / 2
    loss, _ = ppo_policy_loss(logprobs, logprobs.detach(), advantages, MASK, loss_agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(-2.5)


def test_rank_share_makes_the_average_of_rank_losses_the_global_loss():
    """Two ranks, each with one response of the batch above; DDP averages what they back-propagate."""
    for mode in LOSS_AGGREGATIONS:
        global_loss = aggregate(LOSS, MASK, loss_agg=mode, max_new_tokens=10)
        ranks = [(LOSS[i:i + 1], MASK[i:i + 1]) for i in range(2)]
        units = [local_units(m, mode) for _, m in ranks]
        averaged = sum(aggregate(x, m, loss_agg=mode, max_new_tokens=10) * rank_share(u, sum(units), 2)
                       for (x, m), u in zip(ranks, units)) / 2
        assert averaged.item() == pytest.approx(global_loss.item()), mode
    assert local_units(MASK, "token-mean") == 4.0 and local_units(MASK, "seq-mean-token-mean") == 2.0


# ---------------------------------------------------------------- group baselines, by hand
def _outcome(scores):
    """Token rewards of one-token responses carrying only the score (no KL): A = the normalised score."""
    mask = torch.ones(len(scores), 1)
    return token_rewards(torch.tensor(scores), torch.zeros(len(scores), 1), mask, 0.0), mask


def test_group_norm_unbiased_and_group_mean_by_hand():
    rewards, mask = _outcome([1.0, 0.0, 0.0, 0.0])  # one group of K = 4, mean 0.25
    # population std sqrt(3/16) = 0.4330; unbiased std sqrt(3/12) = 0.5
    returns = discounted_returns(rewards, mask, 1.0)  # the baselines themselves, with no eps
    population = group_norm(returns, rewards, mask, None, group_size=4, gamma=1.0, eps=0.0)
    unbiased = group_norm_unbiased(returns, rewards, mask, None, group_size=4, gamma=1.0, eps=0.0)
    no_std, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="group_mean", group_size=4)
    torch.testing.assert_close(unbiased[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / 0.5)
    torch.testing.assert_close(population[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(3 / 16))
    torch.testing.assert_close(no_std[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # group_mean is rloo scaled by (K - 1) / K
    rloo, _ = reinforce_advantages(rewards, None, mask, gamma=1.0, baseline="rloo", group_size=4)
    torch.testing.assert_close(no_std, rloo * 3 / 4)


def test_group_mean_keeps_the_kl_part_of_the_return_in_reward_units():
    """With the scores given, only they are centred: the per-token KL penalty is not touched."""
    mask = torch.ones(2, 2)
    kl = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    scores = torch.tensor([1.0, 3.0])
    rewards = token_rewards(scores, kl, mask, 1.0)  # [[-0.5, 1], [0, 3]]
    advantages, _ = reinforce_advantages(rewards, None, mask, scores, gamma=1.0, baseline="group_mean", group_size=2)
    # centred scores -1, +1 replace 1, 3 at the last token; return-to-go
    torch.testing.assert_close(advantages, torch.tensor([[-1.5, -1.0], [1.0, 1.0]]))


# ---------------------------------------------------------------- dual clip, by hand
def test_dual_clip_caps_a_negative_advantages_loss_at_c():
    logprobs = torch.tensor([[0.0, 0.0]], requires_grad=True)
    logprobs_old = torch.tensor([[-math.log(5.0), -math.log(5.0)]])  # ratio 5 on both tokens
    advantages = torch.tensor([[-1.0, 1.0]])
    plain, _ = ppo_policy_loss(logprobs, logprobs_old, advantages, torch.ones(1, 2))
    # A = -1: max(5, 0.8... clipped 1.2 -> 1.2) = 5; A = +1: max(-5, -1.2) = -1.2; mean (5 - 1.2) / 2
    assert plain.item() == pytest.approx((5.0 - 1.2) / 2)
    loss, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, torch.ones(1, 2), clip_ratio_c=3.0)
    # A = -1: min(5, -A * c = 3) = 3; A = +1 untouched: -1.2
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2)
    assert stats["clip_frac_lower"].item() == pytest.approx(0.5)
    loss.backward()
    assert logprobs.grad.tolist() == [[0.0, 0.0]]  # both tokens clipped: no gradient


def test_dual_clip_leaves_ratios_below_c_alone():
    generator = torch.Generator().manual_seed(1)
    logprobs = -torch.rand(3, 4, generator=generator)
    logprobs_old = logprobs + 0.1 * torch.randn(3, 4, generator=generator)  # ratios near 1, far below c = 3
    advantages = torch.randn(3, 4, generator=generator)
    mask = torch.ones(3, 4)
    plain, _ = ppo_policy_loss(logprobs, logprobs_old, advantages, mask)
    dual, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, mask, clip_ratio_c=3.0)
    torch.testing.assert_close(dual, plain)
    assert stats["clip_frac_lower"].item() == 0.0


# ---------------------------------------------------------------- KL estimators, by hand
def test_kl_k2_and_k3_clamped_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -30.0, -1.0]])
    logprobs_ref = torch.tensor([[-2.0, -1.0, -1.0, -40.0]])
    # k2 = 0.5 * (logp - logp_ref)^2
    torch.testing.assert_close(kl_k2(logprobs, logprobs_ref), torch.tensor([[0.5, 0.5, 0.5 * 29 ** 2, 0.5 * 39 ** 2]]))
    clamped = kl_k3_clamped(logprobs, logprobs_ref)
    # within range: plain k3 (u = -1: e^-1 + 1 - 1 = e^-1; u = 1: e - 2)
    torch.testing.assert_close(clamped[0, :2], kl_k3(logprobs, logprobs_ref)[0, :2])
    assert clamped[0, 1].item() == pytest.approx(math.e - 2)
    # u = 29 (k3 = e^29 - 30) and u = -39 (k3 = 38 + e^-39): both clamped to 10
    assert clamped[0, 2].item() == 10.0 and clamped[0, 3].item() == 10.0
    assert kl_k3(logprobs, logprobs_ref)[0, 2].item() > 1e12


def test_kl_k2_gradient_is_the_log_ratio():
    """k2's gradient (logp - logp_ref) grad logp: in expectation the true gradient of KL(pi || pi_ref)."""
    logprobs = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    kl_k2(logprobs, torch.tensor([[-2.0, -1.0]])).sum().backward()
    assert logprobs.grad.tolist() == [[1.0, -2.0]]


def test_kl_estimators_in_the_loss_are_registered_as_such():
    assert not KL_ESTIMATORS.trait("k2", "in_reward") and not KL_ESTIMATORS.trait("k3_clamped", "in_reward")


# ---------------------------------------------------------------- DAPO overlong shaping, by hand
def test_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then -1/4 per token, -1 at the limit
    lengths = torch.tensor([1, 6, 7, 8, 10])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert overlong_penalty(torch.tensor([12.0]), 10, 4).item() == -1.0  # past the limit (DAPO's third case)
    with pytest.raises(ValueError, match="buffer_length <= max_length"):
        overlong_penalty(lengths, 10, 11)


def verl_dapo_overlong_reward(valid_response_length, max_resp_len, overlong_buffer_len, penalty_factor=1.0):
    """verl ``DAPORewardManager`` overlong branch (verl/experimental/reward_loop/reward_manager/dapo.py lines
    103-109), one response."""
    expected_len = max_resp_len - overlong_buffer_len
    exceed_len = valid_response_length - expected_len
    return min(-exceed_len / overlong_buffer_len * penalty_factor, 0)


def test_overlong_penalty_equals_verl_up_to_the_limit():
    lengths = torch.arange(1, 65)
    ours = overlong_penalty(lengths, 64, 16)
    verl = torch.tensor([verl_dapo_overlong_reward(int(n), 64, 16) for n in lengths])
    torch.testing.assert_close(ours, verl)


# ---------------------------------------------------------------- equality with verl on random tensors
def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, loss_scale_factor=None):
    """verl ``agg_loss`` (core_algos.py lines 1025-1081), one process (dp_size=1, batch counts local)."""
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return (seq_losses * seq_mask).sum() / seq_mask.sum()
    if loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        return torch.sum(seq_losses) / (loss_scale_factor or loss_mask.shape[-1])
    raise ValueError(loss_agg_mode)


def verl_grpo_advantage(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl ``compute_grpo_outcome_advantage`` (core_algos.py lines 266-330): torch.std is the unbiased std."""
    scores = token_level_rewards.sum(dim=-1)
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        stacked = torch.stack(id2score[idx])
        id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        if norm_adv_by_std_in_grpo:
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        else:
            scores[i] = scores[i] - id2mean[index[i]]
    return scores.unsqueeze(-1) * response_mask


def verl_vanilla_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                             loss_agg_mode):
    """verl ``compute_policy_loss_vanilla`` (core_algos.py lines 1159-1250), without rollout correction weights."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = ((clip_pg_losses1 > pg_losses3) * (advantages < 0).float() * response_mask).sum() / response_mask.sum()
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return verl_agg_loss(pg_losses, response_mask, loss_agg_mode), pg_clipfrac_lower


def verl_kl_penalty_forward(logprob, ref_logprob, kl_penalty):
    """verl ``kl_penalty_forward`` (core_algos.py lines 1867-1902), modes k2 / mse and k3 / low_var_kl."""
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    raise ValueError(kl_penalty)


def _random_batch(seed, B=8, T=7):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    logprobs = -3 * torch.rand(B, T, generator=generator, dtype=torch.float64)
    logprobs_old = logprobs + 1.5 * torch.randn(B, T, generator=generator, dtype=torch.float64)  # ratios ~0.05 .. 20
    advantages = torch.randn(B, T, generator=generator, dtype=torch.float64)
    return mask.double(), logprobs, logprobs_old, advantages


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregations_equal_verl(seed, mode):
    mask, loss_mat, _, _ = _random_batch(seed)
    torch.testing.assert_close(aggregate(loss_mat, mask, loss_agg=mode), verl_agg_loss(loss_mat, mask, mode))


@pytest.mark.parametrize("seed", [0, 1])
def test_dr_grpo_normaliser_is_verls_divided_by_the_number_of_responses(seed):
    mask, loss_mat, _, _ = _random_batch(seed)
    ours = aggregate(loss_mat, mask, loss_agg="seq-mean-token-sum-norm", max_new_tokens=16)
    verl = verl_agg_loss(loss_mat, mask, "seq-mean-token-sum-norm", loss_scale_factor=16)
    torch.testing.assert_close(ours, verl / mask.shape[0])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("baseline, norm_by_std", [("group_norm_unbiased", True), ("group_mean", False)])
def test_group_baselines_equal_verls_grpo(seed, baseline, norm_by_std):
    """Outcome rewards only (verl's GRPO sums the token rewards): our scores-given path on the same rows."""
    generator = torch.Generator().manual_seed(seed)
    K, prompts, T = 4, 3, 5
    mask, _, _, _ = _random_batch(seed, B=K * prompts, T=T)
    scores = torch.randint(0, 3, (K * prompts,), generator=generator).double()  # ties: some groups all equal
    rewards = token_rewards(scores, torch.zeros_like(mask), mask, 0.0)
    ours, _ = reinforce_advantages(rewards, None, mask, scores, gamma=1.0, baseline=baseline, group_size=K)  # eps 1e-6
    index = [i // K for i in range(K * prompts)]
    verl = verl_grpo_advantage(rewards.clone(), mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm_by_std)
    torch.testing.assert_close(ours, verl)


@pytest.mark.parametrize("seed", [1, 2, 3])  # seeds whose ratios pass c on a real token with A < 0
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_dual_clip_ppo_equals_verl(seed, mode):
    mask, logprobs, logprobs_old, advantages = _random_batch(seed)
    ours, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, mask, clip_low=0.2, clip_high=0.28,
                                  clip_ratio_c=3.0, loss_agg=mode)
    verl, clipfrac_lower = verl_vanilla_policy_loss(logprobs_old, logprobs, advantages, mask, 0.2, 0.28, 3.0, mode)
    torch.testing.assert_close(ours, verl)
    torch.testing.assert_close(stats["clip_frac_lower"], clipfrac_lower)
    assert clipfrac_lower > 0  # the random ratios reach past c: the dual clip was exercised


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_estimators_equal_verl(seed):
    _, logprobs, logprobs_ref, _ = _random_batch(seed)
    logprobs_ref = logprobs_ref * 4  # log-ratios up to ~10: verl's clamps matter
    torch.testing.assert_close(kl_k2(logprobs, logprobs_ref), verl_kl_penalty_forward(logprobs, logprobs_ref, "k2"))
    verl_k3 = verl_kl_penalty_forward(logprobs, logprobs_ref, "low_var_kl")
    torch.testing.assert_close(kl_k3_clamped(logprobs, logprobs_ref), verl_k3)
    assert (verl_k3 == 10).any()  # the clamp was exercised
