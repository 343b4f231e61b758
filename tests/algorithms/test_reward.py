"""Reward-model pairwise loss: hand-computed values, margin, centering, gradients, stability."""

import math

import pytest
import torch

from rlhf_cli.algorithms import pairwise_loss

LOG2 = math.log(2.0)
SOFTPLUS_MINUS_2 = math.log(1.0 + math.exp(-2.0))  # -log sigmoid(2) = 0.12693


def test_loss_by_hand_without_margin():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    loss, stats = pairwise_loss(chosen, rejected)
    # gaps 2, 0, -2: (-log s(2) - log s(0) - log s(-2)) / 3 = (0.12693 + 0.69315 + 2.12693) / 3
    expected = (SOFTPLUS_MINUS_2 + LOG2 + (2.0 + SOFTPLUS_MINUS_2)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["bt_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)  # only the first pair strictly wins
    assert stats["margin"].item() == pytest.approx(0.0)  # (2 + 0 - 2) / 3


def test_loss_by_hand_with_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # gap - margin: 2 - 2 = 0 and 0 - (-2) = 2 -> (log 2 + -log s(2)) / 2
    loss, stats = pairwise_loss(chosen, rejected, margin=torch.tensor([2.0, -2.0]))
    assert loss.item() == pytest.approx((LOG2 + SOFTPLUS_MINUS_2) / 2, abs=1e-6)
    assert stats["margin"].item() == pytest.approx(1.0)  # the reported margin is r_c - r_r, without m
    # a zero margin is the same as no margin
    no_margin, _ = pairwise_loss(chosen, rejected)
    zero_margin, _ = pairwise_loss(chosen, rejected, margin=torch.zeros(2))
    assert zero_margin.item() == pytest.approx(no_margin.item())


def test_centering_term_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # centering: mean((2 + 0)^2, (0 + 0)^2) = 2; with c = 0.5 it adds 1.0
    loss, stats = pairwise_loss(chosen, rejected, center_coef=0.5)
    assert stats["center_loss"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx((SOFTPLUS_MINUS_2 + LOG2) / 2 + 1.0, abs=1e-6)
    # adding the same constant to every score leaves the BT term alone but not the centering term
    shifted, shifted_stats = pairwise_loss(chosen + 5, rejected + 5, center_coef=0.5)
    assert shifted_stats["bt_loss"].item() == pytest.approx(stats["bt_loss"].item(), abs=1e-6)
    assert shifted.item() > loss.item()


def test_gradients_by_hand():
    chosen = torch.tensor([0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, -1.0], requires_grad=True)
    loss, _ = pairwise_loss(chosen, rejected)
    loss.backward()
    # d/dr_c of -log s(r_c - r_r) / B = -(1 - s(gap)) / B; gaps 0 and 2
    expected = -torch.tensor([0.5, 1 - torch.sigmoid(torch.tensor(2.0)).item()]) / 2
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_large_gaps_are_finite():
    loss, _ = pairwise_loss(torch.tensor([-100.0, 100.0]), torch.tensor([0.0, 0.0]))
    # -log s(-100) = 100 (to float precision), -log s(100) = 0
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(50.0, abs=1e-4)

