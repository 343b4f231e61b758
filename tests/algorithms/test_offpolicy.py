"""Off-policy correction of rollout.mode=async (algorithms/offpolicy.py) against hand-computed values."""

from __future__ import annotations

import math

import torch

from rlhf_cli.algorithms import gae, truncated_importance_weights, vtrace


def test_importance_weights_are_the_ratio_truncated_and_zero_on_padding():
    # pi_prox / mu = e, 1/e, e^0.5 (truncated at rho_max), and a padding token
    proximal = torch.tensor([[0.0, -1.0, -0.5, -3.0]])
    behaviour = torch.tensor([[-1.0, 0.0, -1.0, -0.1]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights = truncated_importance_weights(proximal, behaviour, mask, rho_max=1.0)
    assert torch.allclose(weights, torch.tensor([[1.0, math.exp(-1), 1.0, 0.0]]))
    weights = truncated_importance_weights(proximal, behaviour, mask, rho_max=2.0)
    assert torch.allclose(weights, torch.tensor([[2.0, math.exp(-1), math.exp(0.5), 0.0]]))


def test_vtrace_by_hand():
    """gamma = lam = 1, r = (0, 1), V = (0.5, 0.25), rho = (0.5, 1), c = lam min(1, rho) = (0.5, 1).
    t=1: td = 1 + 0 - 0.25 = 0.75; vs - V = 1 x 0.75 = 0.75 -> vs = 1.0; A = 0.75.
    t=0: td = 0 + 0.25 - 0.5 = -0.25; vs - V = 0.5 x -0.25 + 1 x 0.5 x 0.75 = 0.25 -> vs = 0.75;
         A = td + gamma lam (vs[1] - V[1]) = -0.25 + 0.75 = 0.5 (IMPALA's r + gamma vs[1] - V: 0 + 1.0 - 0.5)."""
    rewards, values = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.25, 9.0]])
    mask, rho = torch.tensor([[1, 1, 0]]), torch.tensor([[0.5, 1.0, 0.0]])
    advantages, returns = vtrace(rewards, values, mask, rho, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[0.75, 1.0, 0.0]]))
    assert torch.allclose(advantages, torch.tensor([[0.5, 0.75, 0.0]]))


def test_vtrace_on_policy_is_gae():
    """Every weight 1 (async with max_lag=0): V-trace's targets and advantages are GAE's."""
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([[7], [3], [1], [5]])).long()
    advantages, returns = vtrace(rewards, values, mask, mask.float(), gamma=0.9, lam=0.8)
    gae_advantages, gae_returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(advantages, gae_advantages, atol=1e-6) and torch.allclose(returns, gae_returns, atol=1e-6)
    # a stale token (rho < 1) cuts the trace: the target moves toward the one-step TD target
    rho = mask.float().clone()
    rho[0, 3] = 0.0
    _, cut = vtrace(rewards, values, mask, rho, gamma=0.9, lam=0.8)
    assert torch.allclose(cut[0, 3], values[0, 3]) and torch.allclose(cut[0, 4:], gae_returns[0, 4:], atol=1e-6)
