"""Advantage estimators: return-to-go with REINFORCE baselines, GAE, n-step TD.

Shapes: B responses x T response tokens; ``response_mask`` (B, T) is 1 on
real tokens (a prefix of each row). The K samples of one prompt are
contiguous rows: ``[i*K:(i+1)*K]``. Every estimator returns
``(advantages, returns)``, both (B, T), detached, 0 on padding. Returns are
taken before any whitening (whiten advantages afterwards with
:func:`rlhf_cli.algorithms.core.masked_whiten`).

Estimators are chosen by ``algorithm.advantage`` from :data:`ADVANTAGE_ESTIMATORS`;
every entry is ``estimator(rewards, values, response_mask, scores=None, *, <keys>)
-> (advantages, returns)``, its keyword parameters the algorithm's config keys and
the run's ``group_size`` (K) and ``running_mean`` that it reads (bound once at setup:
``registry.bind``). Traits: ``needs_values``, it bootstraps from a critic's values
(``values`` is None for the others); ``vtrace``, V-trace replaces it on lagged
(async) rollouts, where with every weight 1 V-trace is this estimator.
REINFORCE's baselines are :data:`BASELINES`, one function each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_cli.algorithms.core import RunningMean, bool_mask
from rlhf_cli.algorithms.registry import Registry, bind

ADVANTAGE_ESTIMATORS = Registry("algorithm.advantage",
                                "(rewards, values, response_mask, scores=None, *, <keys it reads>) -> (advantages, returns)",
                                needs_values=False, vtrace=False)



def _zero_padding(x: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(bool_mask(response_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def discounted_returns(rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go over real tokens.

    Formula: ``G[t] = sum_{k >= t} gamma^(k - t) r[k]`` (sum over real
    tokens k; Sutton & Barto, Williams 1992), i.e. ``G[t] = r[t] + gamma G[t+1]``.

    Args:
        rewards: (B, T) token rewards (see ``core.token_rewards``).
        response_mask: (B, T) bool or 0/1.
        gamma: discount factor.

    Returns:
        (B, T) returns, detached, 0 on padding.
    """
    rewards = _zero_padding(rewards.detach(), response_mask)
    running = torch.zeros_like(rewards[:, 0])
    returns_reversed = []
    for t in reversed(range(rewards.shape[1])):  # O(T) steps, each vectorised over B
        running = rewards[:, t] + gamma * running
        returns_reversed.append(running)
    returns = torch.stack(returns_reversed[::-1], dim=1)
    return _zero_padding(returns, response_mask)


@ADVANTAGE_ESTIMATORS.register("gae", needs_values=True, vtrace=True)
def gae(rewards: Tensor, values: Tensor, response_mask: Tensor, scores: Tensor | None = None, *,
        gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016, eq. 16).

    Formula: ``delta[t] = r[t] + gamma V[t+1] - V[t]``,
    ``A[t] = delta[t] + gamma lam A[t+1]``, with ``V[t+1] = 0`` and
    ``A[t+1] = 0`` past the last real token (the episode ends with the
    response). Returns ``R = A + V`` (the critic's target, before whitening).

    Args:
        rewards: (B, T) token rewards.
        values: (B, T) critic values V[t] of the state before token t.
        response_mask: (B, T) bool or 0/1.
        scores: unused (the rewards hold them).
        gamma: discount factor.
        lam: GAE lambda (0: one-step TD, 1: Monte-Carlo return minus V).

    Returns:
        ``(advantages, returns)``, each (B, T), detached, 0 on padding.
    """
    rewards = _zero_padding(rewards.detach(), response_mask)
    values = _zero_padding(values.detach().to(rewards.dtype), response_mask)
    next_value = torch.zeros_like(values[:, 0])
    last_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages_reversed.append(last_advantage)
        next_value = values[:, t]
    advantages = _zero_padding(torch.stack(advantages_reversed[::-1], dim=1), response_mask)
    returns = _zero_padding(advantages + values, response_mask)
    return advantages, returns


@ADVANTAGE_ESTIMATORS.register("nstep", needs_values=True)
def nstep_advantages(rewards: Tensor, values: Tensor, response_mask: Tensor, scores: Tensor | None = None, *,
                     gamma: float, nstep: int) -> tuple[Tensor, Tensor]:
    """n-step TD advantages (Mnih et al. 2016, A3C; GAE with lambda = 1 truncated at n).

    Formula (n = ``nstep``): ``R[t] = sum_{k=0}^{n-1} gamma^k r[t+k] + gamma^n V[t+n]``,
    ``A[t] = R[t] - V[t]``; rewards and values past the last real token are
    0 (so the bootstrap vanishes near the end). For ``n >= T`` this equals
    :func:`gae` with ``lam = 1``.

    Args:
        rewards: (B, T) token rewards.
        values: (B, T) critic values.
        response_mask: (B, T) bool or 0/1.
        gamma: discount factor.
        scores: unused (the rewards hold them).
        nstep: n, the number of reward steps before bootstrapping (>= 1).

    Returns:
        ``(advantages, returns)``, each (B, T), detached, 0 on padding.
    """
    n = nstep
    if n < 1:
        raise ValueError(f"nstep_advantages: n must be >= 1, got {n}")
    rewards = _zero_padding(rewards.detach(), response_mask)
    values = _zero_padding(values.detach().to(rewards.dtype), response_mask)
    num_tokens = rewards.shape[1]
    horizon = min(n, num_tokens)  # steps past T only add zeros
    # pad on the right so that r[t+k], V[t+n] are 0 beyond T: (B, T + horizon)
    rewards_padded = torch.nn.functional.pad(rewards, (0, horizon))
    values_padded = torch.nn.functional.pad(values, (0, horizon))
    returns = torch.zeros_like(rewards)
    for k in range(horizon):  # O(n) vectorised shifts
        returns = returns + (gamma**k) * rewards_padded[:, k : k + num_tokens]
    if n <= num_tokens:
        returns = returns + (gamma**n) * values_padded[:, n : n + num_tokens]
    returns = _zero_padding(returns, response_mask)
    advantages = _zero_padding(returns - values, response_mask)
    return advantages, returns


# ---------------------------------------------------------------- REINFORCE baselines
BASELINES = Registry("algorithm.baseline", "(returns, rewards, response_mask, scores, *, <keys it reads>) -> (B, T)",
                     compares_group=False)
GROUP_STD_EPS = 1e-6  # added to a group's std before dividing by it (verl's epsilon)


@BASELINES.register("none")
def no_baseline(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None) -> Tensor:
    """``A[b,t] = G[b,t]``: the return-to-go itself.

    Args:
        returns: (B, T) return-to-go G; rewards (B, T), response_mask (B, T), scores (B,) or None: unused.

    Returns:
        (B, T) advantages (padding zeroed by the caller).
    """
    return returns


@BASELINES.register("mean")
def running_mean_baseline(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *,
                          running_mean: RunningMean | None) -> Tensor:
    """``A[b,t] = G[b,t] - m``, m the running mean of the sequence returns ``s_b = G[b, 0]`` over past batches.

    On the first batch (``running_mean.count == 0``) m is the mean of this batch's s. ``running_mean`` is then
    updated with this batch's s (in place). Under torchrun pass an all-reducing running mean
    (``distributed.GlobalRunningMean``): m is then the mean over every rank's rows.

    Args:
        returns: (B, T) return-to-go G; rewards, response_mask, scores: unused.
        running_mean: the state (required).

    Returns:
        (B, T) advantages.
    """
    if running_mean is None:
        raise ValueError("baseline 'mean' needs a RunningMean instance (running_mean=...)")
    sequence_returns = returns[:, 0]
    if running_mean.count > 0:
        advantages = returns - running_mean.value
        running_mean.update(sequence_returns)
        return advantages
    running_mean.update(sequence_returns)  # first batch: its own mean (over every rank's rows when all-reduced)
    return returns - running_mean.value


@BASELINES.register("rloo", compares_group=True)
def leave_one_out(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *,
                  group_size: int) -> Tensor:
    """Leave-one-out (Ahmadian et al. 2024, "Back to Basics"): ``A[b,t] = G[b,t] - (1/(K-1)) sum_{j != b} s_j``.

    The sum is over the other samples of b's group (rows ``[g*K:(g+1)*K]``), ``s_j = G[j, 0]``; K >= 2.

    Args:
        returns: (B, T) return-to-go G; rewards, response_mask, scores: unused.
        group_size: K samples per prompt.

    Returns:
        (B, T) advantages.
    """
    grouped = returns[:, 0].view(-1, group_size)  # (B/K, K)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (B/K, K)
    return returns - others_mean.reshape(-1, 1)


@BASELINES.register("rloo_position", compares_group=True)
def leave_one_out_per_position(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *,
                               group_size: int) -> Tensor:
    """Leave-one-out matched to the return it is subtracted from: ``A[b,t] = G[b,t] - (1/(K-1)) sum_{j != b} Ĝ[j,t]``.

    ``Ĝ[j,t] = G[j, min(t, L_j)]``: the other sample's return-to-go from the same position, and past its last real
    token L_j what its last token earned. ``rloo`` subtracts the others' whole-sequence return ``G[j,0]`` from every
    token's return-to-go; with rewards inside the response (process rewards, one per step) a late token's
    return-to-go holds only the steps after it, so it gets a large negative offset whatever it did. Here each
    position's baseline is the others' reward from that position on. With the reward at the last token alone
    (outcome rewards, no per-token KL) ``Ĝ[j,t] = s_j`` and this is ``rloo`` exactly. The baseline reads no action
    of b's, so the estimator stays unbiased. A baseline of this project (issue 30's per-step credit), no
    published counterpart: the per-step analogue is Kazemnejad et al.'s VinePPO (2024), which values each step by
    Monte Carlo rollouts from it.

    Args:
        returns: (B, T) return-to-go G, 0 on padding; rewards, scores: unused.
        response_mask: (B, T) bool or 0/1, each row's real tokens first.
        group_size: K samples per prompt (rows ``[g*K:(g+1)*K]``), K >= 2.

    Returns:
        (B, T) advantages (padding zeroed by the caller).
    """
    mask = response_mask.to(returns)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1, keepdim=True)  # (B, 1) last real token
    held = returns.gather(1, torch.minimum(positions[None, :], last))  # (B, T) Ĝ: G up to L, then G[L]
    grouped = held.view(-1, group_size, held.shape[1])  # (B/K, K, T)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (B/K, K, T)
    return returns - others_mean.reshape_as(returns)


def _group_normalised(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None,
                      group_size: int, gamma: float, std: str | None, eps: float) -> Tensor:
    """The group baselines' shared arithmetic: ``ĉ = (c - mean_group(c)) / scale``, scale the group std plus
    eps (std "population" or "unbiased") or 1 (std None), c the scores (else the sequence returns)."""
    c = returns[:, 0] if scores is None else scores.to(returns)
    grouped = c.view(-1, group_size)  # (B/K, K)
    group_mean = grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(-1, 1)
    if std is None:
        scale = torch.ones_like(group_mean)
    else:
        group_std = grouped.std(dim=1, unbiased=std == "unbiased", keepdim=True)
        scale = group_std.expand_as(grouped).reshape(-1, 1) + eps
    if scores is None:
        return (returns - group_mean) / scale
    normalised = (c[:, None] - group_mean) / scale  # (B, 1)
    mask = response_mask.to(returns)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(-1, keepdim=True)  # last real token of each row
    swap = torch.zeros_like(returns).scatter(1, last, normalised - c[:, None])
    return discounted_returns(rewards + swap, response_mask, gamma)


@BASELINES.register("group_norm", compares_group=True)
def group_norm(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *, group_size: int,
               gamma: float, eps: float) -> Tensor:
    """GRPO's outcome supervision (Shao et al. 2024): the group-normalised score, population std.

    Without scores: ``A[b,t] = (G[b,t] - mean_group(s)) / (std_group(s) + eps)``, the population std
    (``unbiased=False``: the group is all we normalise over, so K group-normalised scores have std exactly 1
    up to eps); K >= 2. With ``scores`` (the outcome scores c, (B,)) only they are normalised and the rest of
    the return (per-token KL penalty, process rewards) stays in reward units: A is the return-to-go of the
    rewards with the score at the last real token L_b swapped for its normalised value,
    ``r'[b,t] = r[b,t] + 1[t = L_b] (ĉ_b - c_b)``, ``ĉ = (c - mean_group(c)) / (std_group(c) + eps)``
    (with gamma = 1: ``A[b,t] = G[b,t] - c_b + ĉ_b``). Without this, a group whose scores are all equal has a
    tiny std made of KL differences alone, and dividing the per-token KL part of G by it blows advantages up
    by orders of magnitude (seen as grad norms of 1e3).

    Args:
        returns: (B, T) return-to-go G of ``rewards``.
        rewards: (B, T) token rewards (re-summed when scores are given).
        response_mask: (B, T) bool or 0/1.
        scores: (B,) outcome scores, or None (then c = s).
        group_size: K; gamma: the discount; eps: added to the std (``GROUP_STD_EPS`` in a run).

    Returns:
        (B, T) advantages.
    """
    return _group_normalised(returns, rewards, response_mask, scores, group_size, gamma, "population", eps)


@BASELINES.register("group_norm_unbiased", compares_group=True)
def group_norm_unbiased(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *,
                        group_size: int, gamma: float, eps: float) -> Tensor:
    """:func:`group_norm` with the unbiased (Bessel, K - 1) group std.

    verl's ``compute_grpo_outcome_advantage`` and TRL's GRPOTrainer convention (``torch.std``): advantages
    smaller by ``sqrt((K-1)/K)`` than ``group_norm``'s (0.935 for K = 8), so the two differ only in scale.
    Arguments and shapes as :func:`group_norm`.
    """
    return _group_normalised(returns, rewards, response_mask, scores, group_size, gamma, "unbiased", eps)


@BASELINES.register("group_mean", compares_group=True)
def group_mean(returns: Tensor, rewards: Tensor, response_mask: Tensor, scores: Tensor | None, *, group_size: int,
               gamma: float) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, sec. 3.2; verl's ``norm_adv_by_std_in_grpo=False``): ``ĉ = c - mean_group(c)``.

    No division by the std; otherwise as :func:`group_norm`. Dividing by the std weighs prompts that are
    nearly always (or never) solved most (their std is small): Dr. GRPO's "question-level difficulty bias".
    This is ``rloo`` times ``(K-1)/K``. Arguments and shapes as :func:`group_norm` (no eps).
    """
    return _group_normalised(returns, rewards, response_mask, scores, group_size, gamma, None, 0.0)


def _check_reinforce_args(baseline: str, batch_size: int, group_size: int) -> None:
    """A known baseline, a batch of whole groups, and K >= 2 where the baseline compares a group's samples."""
    BASELINES.get(baseline)
    if group_size < 1 or batch_size % group_size != 0:
        raise ValueError(
            f"batch of {batch_size} responses is not divisible by group_size={group_size} "
            "(samples per prompt); make the batch a multiple of the samples per prompt"
        )
    if BASELINES.trait(baseline, "compares_group") and group_size < 2:
        raise ValueError(
            f"baseline {baseline!r} compares the samples of one prompt and needs group_size >= 2 "
            f"(got {group_size}); sample more responses per prompt or use baseline 'mean' or 'none'"
        )


@ADVANTAGE_ESTIMATORS.register("reinforce")
def reinforce_advantages(rewards: Tensor, values: Tensor | None, response_mask: Tensor, scores: Tensor | None = None,
                         *, gamma: float, baseline: str, group_size: int,
                         running_mean: RunningMean | None = None) -> tuple[Tensor, Tensor]:
    """REINFORCE advantages: return-to-go minus a baseline chosen by name (Williams 1992).

    ``G = discounted_returns(rewards)``, ``A = BASELINES[baseline](G, rewards, response_mask, scores)``, the
    baseline's own keys bound from ``gamma``, ``group_size``, ``running_mean`` and ``eps = GROUP_STD_EPS``
    (each baseline's docstring has its formula). Group g of row b holds rows ``[g*K:(g+1)*K]`` (K =
    ``group_size``).

    Args:
        rewards: (B, T) token rewards.
        values: unused (no critic).
        response_mask: (B, T) bool or 0/1.
        scores: (B,) outcome scores for the group baselines (see :func:`group_norm`); None = ``s``.
        gamma: discount factor.
        baseline: a name in :data:`BASELINES`.
        group_size: K samples per prompt; B must be divisible by K.
        running_mean: state for ``'mean'`` (required there, ignored otherwise).

    Returns:
        ``(advantages, returns)``, each (B, T), detached, 0 on padding; ``returns`` is G (no baseline).
    """
    _check_reinforce_args(baseline, rewards.shape[0], group_size)
    returns = discounted_returns(rewards, response_mask, gamma)
    keys = {"gamma": gamma, "group_size": group_size, "running_mean": running_mean, "eps": GROUP_STD_EPS}
    subtract = bind(BASELINES.get(baseline), keys, 4, "algorithm.baseline")
    return _zero_padding(subtract(returns, rewards, response_mask, scores), response_mask), returns
