"""Policy and value losses, entropy, explained variance.

Shapes: B responses x T response tokens; ``response_mask`` (B, T) is 1 on
real tokens. The policy losses aggregate their (B, T) per-token terms by
``algorithm.loss_agg`` (:mod:`.aggregation`; a token-level mean by default), the
value loss is a token-level mean. Advantages, old log-probs, old values and
returns are treated as constants (detached here).

Policy losses are chosen by ``algorithm.name`` from :data:`POLICY_LOSSES`; every
entry is ``loss(logprobs, logprobs_old, advantages, response_mask, *, <keys>) ->
(loss, stats)``, its keyword parameters the algorithm's config keys (and the run's
``max_new_tokens``) that it reads, bound once at setup (``registry.bind``). Traits: ``needs_critic`` (the algorithm trains a value function),
``trust_region`` (the loss keeps the update near the rollout policy, so several
epochs per batch are allowed and the value loss is clipped too).
"""

from __future__ import annotations

import torch

from rlhf_cli.algorithms.aggregation import aggregate
from rlhf_cli.algorithms.core import masked_mean, masked_var
from rlhf_cli.algorithms.registry import Registry

POLICY_LOSSES = Registry("algorithm.name",
                         "(logprobs, logprobs_old, advantages, response_mask, *, <keys it reads>) -> (loss, stats)",
                         needs_critic=False, trust_region=False)


@POLICY_LOSSES.register("a2c", needs_critic=True)
@POLICY_LOSSES.register("reinforce")
def policy_gradient_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor | None,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    loss_agg: str = "token-mean",
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla policy-gradient loss (Williams 1992, REINFORCE; actor of A2C, Mnih et al. 2016).

    Formula: ``L = agg(-A[t] * logp[t])`` (``agg``: ``algorithm.loss_agg``, a
    token-level mean by default); its gradient is ``-E[A grad log pi]``.

    Args:
        logprobs: (B, T) log-probs of sampled tokens under the current policy (with grad).
        logprobs_old: (B, T) log-probs at sampling time; unused (one on-policy pass).
        advantages: (B, T), detached inside.
        response_mask: (B, T) bool or 0/1.
        loss_agg, max_new_tokens: the aggregation (:func:`.aggregation.aggregate`).

    Returns:
        ``(loss, {})``: 0-dim loss, no stats.
    """
    return aggregate(-advantages.detach() * logprobs, response_mask, loss_agg, max_new_tokens), {}


@POLICY_LOSSES.register("ppo", needs_critic=True, trust_region=True)
def ppo_policy_loss(
    logprobs: torch.Tensor,
    logprobs_old: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg: str = "token-mean",
    max_new_tokens: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), asymmetric clip range, optional dual clip.

    Formula: ``ratio = exp(logp - logp_old)``;
    ``pg_loss1 = -A * ratio``; ``pg_loss2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``;
    ``clipped = max(pg_loss1, pg_loss2)``. Dual clip (Ye et al. 2020, "Mastering Complex
    Control in MOBA Games with Deep RL", arXiv:1912.09729, sec. 3; verl's ``clip_ratio_c``), on tokens with
    ``A < 0`` only: ``pg_loss3 = -A * c``, ``clipped = min(clipped, pg_loss3)``. With
    ``A < 0`` the plain PPO term ``-A * ratio`` grows without bound in the ratio (a token
    the policy now likes far more than at sampling time, e.g. after a few epochs or with
    stale rollouts); the dual clip caps it at ``-A * c``, and its gradient there is 0.
    ``L = agg(clipped)`` (``agg``: ``algorithm.loss_agg``, a token-level mean by default).
    Clip-higher (DAPO, Yu et al. 2025, sec. 3.1) is ``clip_high > clip_low``.

    Stats (detached 0-dim tensors, over real tokens):
        ``ratio_mean``: masked mean of ratio.
        ``clip_frac``: fraction of tokens where the clipped term is active
        (``pg_loss2 > pg_loss1``).
        ``approx_kl``: ``masked_mean((ratio - 1) - log ratio)``, the k3
        estimator of KL(pi_old || pi) under samples from pi_old (Schulman
        2020, "Approximating KL Divergence"; >= 0, as in CleanRL).
        ``clip_frac_lower`` (with dual clip): fraction of tokens where the dual clip is
        active (``A < 0`` and ``clipped > pg_loss3``; verl's ``pg_clipfrac_lower``).

    Args:
        logprobs: (B, T) log-probs under the current policy (with grad).
        logprobs_old: (B, T) log-probs at sampling time (detached inside).
        advantages: (B, T), detached inside.
        response_mask: (B, T) bool or 0/1.
        clip_low, clip_high: clip range ``[1 - clip_low, 1 + clip_high]``.
        clip_ratio_c: dual-clip bound c > 1 (e.g. 3.0), or None for none.
        loss_agg, max_new_tokens: the aggregation (:func:`.aggregation.aggregate`).

    Returns:
        ``(loss, stats)``: 0-dim loss and the stats dict.
    """
    advantages = advantages.detach()
    log_ratio = logprobs - logprobs_old.detach()
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg_loss1, pg_loss2)
    if clip_ratio_c is not None:
        pg_loss3 = -advantages * clip_ratio_c
        dual_active = (advantages < 0) & (clipped > pg_loss3)
        clipped = torch.where(advantages < 0, torch.minimum(clipped, pg_loss3), clipped)
    loss = aggregate(clipped, response_mask, loss_agg, max_new_tokens)
    with torch.no_grad():
        stats = {
            "ratio_mean": masked_mean(ratio, response_mask),
            "clip_frac": masked_mean((pg_loss2 > pg_loss1).to(ratio.dtype), response_mask),
            "approx_kl": masked_mean((ratio - 1) - log_ratio, response_mask),
        }
        if clip_ratio_c is not None:
            stats["clip_frac_lower"] = masked_mean(dual_active.to(ratio.dtype), response_mask)
    return loss, {name: value.detach() for name, value in stats.items()}


def value_loss(
    values: torch.Tensor,
    values_old: torch.Tensor | None,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    clip_range: float | None = None,
) -> torch.Tensor:
    """Critic loss, optionally clipped around the rollout-time values.

    Formula: ``0.5 * masked_mean((V - R)^2)``; with ``clip_range = c``:
    ``V_clip = V_old + clamp(V - V_old, -c, c)``,
    ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``
    (Schulman et al. 2017 baselines code; Huang et al. 2022, "The 37
    Implementation Details of PPO", detail 9).

    Args:
        values: (B, T) current critic values (with grad).
        values_old: (B, T) values at rollout time (detached inside); may be
            None when ``clip_range`` is None.
        returns: (B, T) targets R (detached inside).
        response_mask: (B, T) bool or 0/1.
        clip_range: c, or None for the unclipped loss.

    Returns:
        0-dim loss.
    """
    returns = returns.detach()
    squared_error = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(squared_error, response_mask)
    if values_old is None:
        raise ValueError("value_loss: clip_range needs values_old")
    values_old = values_old.detach()
    values_clipped = values_old + torch.clamp(values - values_old, -clip_range, clip_range)
    squared_error_clipped = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(squared_error, squared_error_clipped), response_mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits``, per position.

    Formula: ``H = -sum_v p_v log p_v = logsumexp(z) - sum_v softmax(z)_v z_v``
    (the logsumexp form is stable for large logits).

    Args:
        logits: (B, T, V) (any leading shape; vocabulary last).

    Returns:
        (B, T) entropies in nats; not masked.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the return variance the critic explains, over real tokens.

    Formula: ``1 - Var(R - V) / Var(R)`` (1: perfect, 0: no better than a
    constant, < 0: worse); NaN when ``Var(R) == 0`` (as in CleanRL's logging).

    Args:
        values: (B, T) critic values.
        returns: (B, T) returns R.
        response_mask: (B, T) bool or 0/1.

    Returns:
        0-dim detached tensor.
    """
    values, returns = values.detach(), returns.detach()
    variance_returns = masked_var(returns, response_mask)
    variance_residual = masked_var(returns - values, response_mask)
    ratio = variance_residual / variance_returns
    return torch.where(variance_returns > 0, 1 - ratio, torch.full_like(ratio, float("nan")))

