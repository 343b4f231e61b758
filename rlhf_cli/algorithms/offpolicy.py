"""Off-policy correction for asynchronous rollouts (rollout.mode=async, rlhf_cli/rl/actors.py).

An actor generates with the behaviour policy mu (the learner's weights of a few updates ago); the learner
updates pi. Three policies are in play, as in decoupled PPO (Hilton, Cobbe & Schulman 2022, "Batch
size-invariance for policy optimization", sec. 3): mu (behaviour: made the tokens), pi_prox (proximal:
the learner's weights at the start of the update, whose log-probs are `logprobs_old`), and pi (being
updated). Every registered policy loss keeps its own ratio pi / pi_prox (PPO's clip included); the
correction from mu to pi_prox is a per-token truncated importance weight on the advantage, and for a
critic the V-trace targets of IMPALA (Espeholt et al. 2018, eq. 1) replace GAE's returns. With
mu = pi_prox (max_lag=0, or an actor holding the newest weights) every weight is 1 and both functions
give exactly the synchronous algorithm (GAE's advantages and returns).
"""

from __future__ import annotations

import torch
from torch import Tensor


def truncated_importance_weights(logprobs_proximal: Tensor, logprobs_behaviour: Tensor, response_mask: Tensor,
                                 rho_max: float) -> Tensor:
    """rho[t] = min(rho_max, pi_prox(a_t | s_t) / mu(a_t | s_t)) (IMPALA's rho-bar truncation, Espeholt et al.
    2018, sec. 4.1; decoupled PPO's behaviour weight pi_prox / mu, Hilton et al. 2022, eq. 2, truncated).

    A policy loss that is a sum of per-token terms, each positively homogeneous in the advantage
    (REINFORCE's -A log pi, PPO's -min(r A, clip(r) A), the dual clip), weighted by rho[t] token by token
    equals that loss with the advantages multiplied by rho: which is how the learner applies it.
    Truncation bounds the variance: the estimate is then of the policy pi_rho between mu and pi
    (IMPALA, sec. 4.1), and rho_max = 1 never up-weights a token.

    Args:
        logprobs_proximal: (B, T) log pi_prox of the sampled tokens (the learner's, before its update).
        logprobs_behaviour: (B, T) log mu of the same tokens (the actor's, with the weights that sampled them).
        response_mask: (B, T) bool or 0/1.
        rho_max: truncation, > 0.

    Returns:
        (B, T) weights in (0, rho_max], detached, 0 on padding.
    """
    log_ratio = (logprobs_proximal.detach() - logprobs_behaviour.detach()).float()
    weights = torch.exp(torch.clamp(log_ratio, max=float(torch.log(torch.tensor(rho_max)))))
    return weights * response_mask.to(weights.dtype)


def vtrace(rewards: Tensor, values: Tensor, response_mask: Tensor, weights: Tensor, *, gamma: float, lam: float,
           c_max: float = 1.0) -> tuple[Tensor, Tensor]:
    """V-trace targets with lambda (Espeholt et al. 2018, eq. 1 and remark 4) and the matching advantages.

    Formula, with rho[t] = `weights[t]` (min(rho_max, pi / mu)) and c[t] = lam * min(c_max, rho[t]):
    ``delta[t] = rho[t] (r[t] + gamma V[t+1] - V[t])``,
    ``vs[t] - V[t] = delta[t] + gamma c[t] (vs[t+1] - V[t+1])``  (the critic's target vs, the `returns`),
    ``A[t] = r[t] + gamma V[t+1] - V[t] + gamma lam (vs[t+1] - V[t+1])``  (the advantage, before rho).
    At lam = 1, A[t] = r[t] + gamma vs[t+1] - V[t], IMPALA's policy-gradient advantage; the learner
    multiplies it by rho[t] (truncated_importance_weights). With every weight 1 (on-policy), vs = GAE's
    returns and A = GAE's advantages (Schulman et al. 2016, eq. 16), so async with max_lag=0 is A2C / PPO.
    V[t+1] = 0 and vs[t+1] - V[t+1] = 0 past the last real token (the episode ends with the response).

    Args:
        rewards: (B, T) token rewards.
        values: (B, T) critic values V[t] of the state before token t (the learner's critic).
        response_mask: (B, T) bool or 0/1.
        weights: (B, T) truncated importance weights rho[t] (0 on padding).
        gamma: discount factor.
        lam: lambda of the traces (GAE's).
        c_max: truncation of the traces c (IMPALA's c-bar; c_max <= rho_max as the paper requires).

    Returns:
        ``(advantages, returns)``, each (B, T), detached, 0 on padding.
    """
    real = response_mask.to(torch.float32) if response_mask.dtype == torch.bool else response_mask.float()
    rewards = rewards.detach().float() * real
    values = values.detach().float() * real
    rho = weights.detach().float() * real
    traces = lam * torch.clamp(rho, max=c_max)
    next_value = torch.zeros_like(values[:, 0])
    next_correction = torch.zeros_like(values[:, 0])  # vs[t+1] - V[t+1]
    corrections, advantages = [], []
    for t in reversed(range(rewards.shape[1])):
        td = rewards[:, t] + gamma * next_value - values[:, t]
        advantages.append((td + gamma * lam * next_correction) * real[:, t])
        next_correction = (rho[:, t] * td + gamma * traces[:, t] * next_correction) * real[:, t]
        corrections.append(next_correction)
        next_value = values[:, t]
    advantages = torch.stack(advantages[::-1], dim=1)
    returns = (torch.stack(corrections[::-1], dim=1) + values) * real
    return advantages, returns
