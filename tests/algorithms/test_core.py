"""Masked statistics, KL estimators, token rewards, KL controllers: hand-computed values."""

import math

import pytest
import torch

from rlhf_cli.algorithms.core import (
    truncated_is_weights,
    AdaptiveKLController,
    FixedKLController,
    RunningMean,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    place_step_rewards,
    token_rewards,
)

# Two ragged rows; padding holds large garbage that must never leak into a statistic.
X = torch.tensor([[1.0, 2.0, 3.0, 1e6], [4.0, 5.0, -1e6, 7e5]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
REAL = [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("mask", [MASK, MASK.bool()])
def test_masked_stats_ignore_padding(mask):
    assert masked_sum(X, mask).item() == 15.0
    assert masked_mean(X, mask).item() == 3.0
    torch.testing.assert_close(masked_sum(X, mask, dim=-1), torch.tensor([6.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(masked_mean(X, mask, dim=-1), torch.tensor([2.0, 4.5], dtype=torch.float64))
    # unbiased: sum (x - 3)^2 = 10 over 5 -> 10/4; biased 10/5
    assert masked_var(X, mask).item() == pytest.approx(2.5)
    assert masked_var(X, mask, unbiased=False).item() == pytest.approx(2.0)
    assert masked_var(X, mask).item() == pytest.approx(torch.tensor(REAL).var().item())


def test_masked_mean_of_empty_row_is_zero():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(masked_mean(torch.ones(2, 2), mask, dim=-1), torch.tensor([1.0, 0.0]))


def test_masked_whiten_over_real_tokens_only():
    whitened = masked_whiten(X, MASK)
    real = whitened[MASK.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(whitened[~MASK.bool()] == 0)
    expected = (torch.tensor(REAL, dtype=torch.float64) - 3.0) / math.sqrt(2.5 + 1e-8)
    torch.testing.assert_close(real, expected)


def test_masked_whiten_without_shift_keeps_mean():
    whitened = masked_whiten(X, MASK, shift_mean=False)
    real = whitened[MASK.bool()]
    assert real.mean().item() == pytest.approx(3.0)
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)


def test_masked_stats_keep_dtype():
    x16 = X.to(torch.bfloat16).clamp(-100, 100)
    assert masked_mean(x16, MASK.bool()).dtype == torch.bfloat16
    assert masked_whiten(X.float(), MASK).dtype == torch.float32


def test_kl_estimators_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    logprobs_ref = torch.tensor([[-1.0, -1.0, -1.5]])
    torch.testing.assert_close(kl_k1(logprobs, logprobs_ref), torch.tensor([[0.0, -1.0, 1.0]]))
    # u = ref - logp = [0, 1, -1]; k3 = e^u - u - 1
    expected_k3 = torch.tensor([[0.0, math.e - 2.0, math.exp(-1.0)]])
    torch.testing.assert_close(kl_k3(logprobs, logprobs_ref), expected_k3)


def test_kl_k3_nonnegative():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(16, 32, generator=generator) * 5
    logprobs_ref = -torch.rand(16, 32, generator=generator) * 5
    assert torch.all(kl_k3(logprobs, logprobs_ref) >= 0)


def test_token_rewards_ragged_rows():
    scores = torch.tensor([10.0, 20.0, 30.0])
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 9.0, 9.0], [1.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    rewards = token_rewards(scores, kl, mask, kl_coef=0.1)
    expected = torch.tensor(
        [
            [-0.1, -0.2, -0.3, 10.0 - 0.4],
            [-0.05, 20.0 - 0.05, 0.0, 0.0],
            [30.0 - 0.1, 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[mask == 0] == 0)
    # sum identity: sum_t r = score - beta * sum_t kl over real tokens
    torch.testing.assert_close(rewards.sum(-1), scores - 0.1 * masked_sum(kl, mask, dim=-1))


def test_token_rewards_sum_identity_random_with_step_rewards():
    generator = torch.Generator().manual_seed(1)
    batch_size, num_tokens = 6, 9
    lengths = torch.randint(1, num_tokens + 1, (batch_size,), generator=generator)
    mask = (torch.arange(num_tokens)[None, :] < lengths[:, None]).float()
    kl = torch.randn(batch_size, num_tokens, generator=generator) * 100 * (1 - mask) + torch.randn(
        batch_size, num_tokens, generator=generator
    )
    scores = torch.randn(batch_size, generator=generator)
    step_rewards = torch.randn(batch_size, num_tokens, generator=generator)
    rewards = token_rewards(scores, kl, mask, kl_coef=0.05, step_rewards=step_rewards)
    assert torch.all(rewards[mask == 0] == 0)
    expected_sum = scores - 0.05 * masked_sum(kl, mask, dim=-1) + masked_sum(step_rewards, mask, dim=-1)
    torch.testing.assert_close(rewards.sum(-1), expected_sum)


def test_token_rewards_rejects_empty_rows():
    with pytest.raises(ValueError, match="at least one real token"):
        token_rewards(torch.ones(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), kl_coef=0.1)


def test_place_step_rewards():
    placed = place_step_rewards([[0.5, 1.0], [], [2.0, 3.0]], [[1, 3], [], [0, 0]], (3, 4), "cpu", torch.float64)
    expected = torch.tensor([[0.0, 0.5, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(placed, expected)
    # placed process rewards flow into token rewards on real tokens
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    rewards = token_rewards(torch.zeros(3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64), mask, 0.1, placed)
    torch.testing.assert_close(rewards, expected)


def test_place_step_rewards_validates():
    with pytest.raises(ValueError, match="outside"):
        place_step_rewards([[1.0]], [[4]], (1, 4), "cpu", torch.float32)
    with pytest.raises(ValueError, match="positions"):
        place_step_rewards([[1.0, 2.0]], [[0]], (1, 4), "cpu", torch.float32)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # above target, within clip: e = 6.6/6 - 1 = 0.1 -> 0.1 * (1 + 0.1 * 256 / 10000)
    controller.update(6.6, n_steps=256)
    assert controller.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10000))
    # far above target: e clipped to +0.2
    before = controller.value
    controller.update(100.0, n_steps=1000)
    assert controller.value == pytest.approx(before * (1 + 0.2 * 1000 / 10000))
    # below target: e = 3/6 - 1 = -0.5 clipped to -0.2
    before = controller.value
    controller.update(3.0, n_steps=1000)
    assert controller.value == pytest.approx(before * (1 - 0.2 * 1000 / 10000))
    # slightly below: e = 5.7/6 - 1 = -0.05
    before = controller.value
    controller.update(5.7, n_steps=500)
    assert controller.value == pytest.approx(before * (1 - 0.05 * 500 / 10000))


def test_fixed_kl_controller_is_constant():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=1000)
    assert controller.value == 0.05
    assert controller.state_dict() == {"value": 0.05}


def test_controller_state_round_trips_through_torch_save(tmp_path):
    controller = AdaptiveKLController(0.2, target=4.0, horizon=100)
    controller.update(8.0, n_steps=10)
    running_mean = RunningMean()
    running_mean.update(torch.tensor([1.0, 2.0, 6.0]))
    path = tmp_path / "state.pt"
    torch.save({"kl": controller.state_dict(), "baseline": running_mean.state_dict()}, path)
    state = torch.load(path, weights_only=True)
    restored = AdaptiveKLController(1.0, target=1.0, horizon=1)
    restored.load_state_dict(state["kl"])
    assert restored.state_dict() == controller.state_dict()
    restored_mean = RunningMean()
    restored_mean.load_state_dict(state["baseline"])
    assert (restored_mean.value, restored_mean.count) == (3.0, 3)


def test_running_mean_is_cumulative():
    running_mean = RunningMean()
    assert running_mean.count == 0
    running_mean.update(torch.tensor([1.0, 3.0]))
    assert running_mean.value == 2.0
    running_mean.update([8.0])
    assert running_mean.value == pytest.approx(4.0)
    assert running_mean.count == 3


def test_truncated_is_weights_by_hand():
    """w = min(exp(lp_train - lp_engine), C) on real tokens, 0 on padding; the logged gap is |difference|."""
    train = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    engine = torch.tensor([[-1.0, -2.5, -2.0], [-1.2, -0.9, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, stats = truncated_is_weights(train, engine, mask, cap=2.0)
    expected = torch.tensor([[1.0, math.exp(0.5), 2.0], [math.exp(0.2), math.exp(-0.1), 0.0]])  # e^1.5 capped at 2
    assert torch.allclose(weights, expected, atol=1e-6)
    assert stats["is_clip_frac"].item() == pytest.approx(1 / 5)
    assert stats["rollout_logprob_diff"].item() == pytest.approx((0 + 0.5 + 1.5 + 0.2 + 0.1) / 5, abs=1e-6)
    assert stats["rollout_logprob_diff_max"].item() == pytest.approx(1.5)
    assert stats["is_weight"].item() == pytest.approx(float(expected.sum()) / 5, abs=1e-6)
    off, stats_off = truncated_is_weights(train, engine, mask, cap=None)
    assert off is None and "is_weight" not in stats_off and "rollout_logprob_diff" in stats_off
