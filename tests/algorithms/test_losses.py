"""Policy/value losses, entropy, explained variance: hand-computed values (as in torchtune's PPO loss tests)."""

import math

import pytest
import torch

from rlhf_cli.algorithms.core import masked_mean
from rlhf_cli.algorithms.losses import (
    POLICY_LOSSES,
    entropy_from_logits,
    explained_variance,
    policy_gradient_loss,
    ppo_policy_loss,
    value_loss,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_policy_gradient_loss_by_hand_and_detaches_advantages():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -100.0, -100.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 2.0, -1.0], [4.0, 50.0, 50.0]], requires_grad=True)
    loss, stats = policy_gradient_loss(logprobs, None, advantages, MASK)
    assert stats == {}
    # -(1*-1 + 2*-2 + -1*-3 + 4*-0.5) / 4 = -(-1 - 4 + 3 - 2) / 4 = 1
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert advantages.grad is None
    torch.testing.assert_close(logprobs.grad, -torch.tensor([[1.0, 2.0, -1.0], [4.0, 0.0, 0.0]]) / 4)


def test_ppo_first_minibatch_is_on_policy():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 5, generator=generator)
    advantages = torch.randn(4, 5, generator=generator)
    mask = torch.ones(4, 5)
    mask[2, 3:] = 0
    loss, stats = ppo_policy_loss(logprobs, logprobs.clone(), advantages, mask)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"].item() == 0.0
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(loss, -masked_mean(advantages, mask))
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())


def test_ppo_positive_advantage_large_ratio_is_clipped():
    logprobs = torch.tensor([[0.0]], requires_grad=True)
    logprobs_old = torch.tensor([[-1.0]])  # ratio = e
    advantages = torch.tensor([[2.0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert stats["ratio_mean"].item() == pytest.approx(math.e)
    assert stats["clip_frac"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(math.e - 1 - 1)
    loss.backward()
    assert logprobs.grad.item() == 0.0  # clipped: no gradient


def test_ppo_negative_advantage_small_ratio_is_clipped():
    logprobs = torch.tensor([[-1.0]])
    logprobs_old = torch.tensor([[0.0]])  # ratio = 1/e < 0.8
    advantages = torch.tensor([[-3.0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, torch.ones(1, 1))
    # pg_loss1 = 3/e ~ 1.10, pg_loss2 = 3 * 0.8 = 2.4 -> max = 2.4
    assert loss.item() == pytest.approx(2.4)
    assert stats["clip_frac"].item() == 1.0


def test_ppo_unclipped_side_keeps_ratio():
    # A > 0 and ratio small: the unclipped term is the larger loss (pessimistic bound)
    loss, stats = ppo_policy_loss(torch.tensor([[-1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-2.0 / math.e)
    assert stats["clip_frac"].item() == 0.0


def test_ppo_asymmetric_clip_and_mixed_tokens():
    logprobs_old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.1, 0.5, 2.0]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo_policy_loss(logprobs, logprobs_old, advantages, mask, clip_low=0.1, clip_high=0.3)
    # token 0: ratio 1.5 clipped to 1.3 -> -1.3 ; token 1: 1.1 inside -> -1.1 ;
    # token 2: A<0, ratio 0.5 clipped to 0.9 -> +0.9 ; token 3 is padding.
    assert loss.item() == pytest.approx((-1.3 - 1.1 + 0.9) / 3)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 1.1 + 0.5) / 3)
    expected_kl = sum((r - 1) - math.log(r) for r in (1.5, 1.1, 0.5)) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)


def test_value_loss_unclipped_and_clipped():
    values = torch.tensor([[1.0, 3.0], [0.0, 99.0]])
    values_old = torch.tensor([[0.0, 2.5], [0.5, 0.0]])
    returns = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # unclipped: 0.5 * (1 + 9 + 1) / 3
    assert value_loss(values, values_old, returns, mask).item() == pytest.approx(0.5 * 11 / 3)
    assert value_loss(values, None, returns, mask).item() == pytest.approx(0.5 * 11 / 3)
    # clip 0.2: V_clip = [0.2, 2.7, 0.3]; (V_clip - R)^2 = [3.24, 7.29, 0.49]
    # max with [1, 9, 1] -> [3.24, 9, 1]
    clipped = value_loss(values, values_old, returns, mask, clip_range=0.2)
    assert clipped.item() == pytest.approx(0.5 * (3.24 + 9.0 + 1.0) / 3)


def test_entropy_from_logits():
    uniform = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(7)))
    # one-hot-ish with huge logits stays finite and ~0
    peaked = torch.tensor([[[1e4, 0.0, 0.0]]])
    entropy = entropy_from_logits(peaked)
    assert torch.isfinite(entropy).all() and entropy.abs().item() < 1e-6
    # two-way distribution p = [0.75, 0.25] by hand
    logits = torch.log(torch.tensor([[[0.75, 0.25]]], dtype=torch.float64)) + 5.0
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert entropy_from_logits(logits).item() == pytest.approx(expected)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, 2.5)
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_policy_loss_registry():
    assert POLICY_LOSSES.get("reinforce") is policy_gradient_loss
    assert POLICY_LOSSES.get("a2c") is policy_gradient_loss
    assert POLICY_LOSSES.get("ppo") is ppo_policy_loss
    assert list(POLICY_LOSSES) == ["reinforce", "a2c", "ppo"]  # the order config messages list them in
    assert [POLICY_LOSSES.trait(n, "needs_critic") for n in POLICY_LOSSES] == [False, True, True]
    assert [POLICY_LOSSES.trait(n, "trust_region") for n in POLICY_LOSSES] == [False, False, True]
