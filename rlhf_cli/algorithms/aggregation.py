"""Loss aggregation: how a (B, T) matrix of per-token loss terms becomes one number (``algorithm.loss_agg``).

Every entry is ``agg(loss_mat, response_mask, *, <keys it reads>) -> 0-dim`` (the one key
there is: ``max_new_tokens``) and has
the trait ``unit``: ``"token"`` (the loss is a mean over tokens) or ``"sequence"``
(a mean over responses). The trait says how ranks are weighted under DDP: DDP
averages the ranks' gradients, so a rank's local loss is scaled by
``local_units * world_size / global_units`` (:func:`rank_share`), which makes the
update the gradient of the same aggregation over every rank's rows at once.

Shapes: B responses x T response tokens; ``response_mask`` (B, T) is 1 on real
tokens (every row has at least one: its stop token or one sampled token).

Which to use (Liu et al. 2025, "Understanding R1-Zero-Like Training", Dr. GRPO;
Yu et al. 2025, DAPO, sec. 3.3):

- ``token-mean`` (default; DAPO's token-level loss): every token weighs the same,
  so long responses weigh more in total. Unbiased in length.
- ``seq-mean-token-mean`` (GRPO as published, Shao et al. 2024, eq. 3): each
  response weighs the same, its tokens share that weight, so a token of a short
  response counts more than one of a long one. With a negative advantage that
  favours making wrong answers longer (Dr. GRPO's "length bias").
- ``seq-mean-token-sum``: sum over a response's tokens, mean over responses; the
  loss (and gradient) grows with response length.
- ``seq-mean-token-sum-norm`` (Dr. GRPO): the token sum divided by a constant
  (``max_new_tokens``, the response length limit), mean over responses: every
  token weighs ``1 / (B * L_max)``, a constant, so no length bias, and the scale
  does not change as responses grow or shrink during training.
"""

from __future__ import annotations

import torch

from rlhf_cli.algorithms.core import bool_mask, masked_mean, masked_sum
from rlhf_cli.algorithms.registry import Registry, bind

LOSS_AGGREGATIONS = Registry("algorithm.loss_agg", "(loss_mat, response_mask, *, <max_new_tokens if read>) -> 0-dim loss",
                             unit="token")


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean(loss_mat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over every real token of the batch.

    Formula: ``L = sum_{b,t} m[b,t] l[b,t] / sum_{b,t} m[b,t]`` (verl ``agg_loss``
    mode ``token-mean``; DAPO's token-level policy-gradient loss, Yu et al. 2025, eq. 12).

    Args:
        loss_mat: (B, T) per-token loss terms.
        response_mask: (B, T) bool or 0/1.

    Returns:
        0-dim loss.
    """
    return masked_mean(loss_mat, response_mask)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean", unit="sequence")
def seq_mean_token_mean(loss_mat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token mean within each response, then the mean over responses (GRPO, Shao et al. 2024, eq. 3).

    Formula: ``L = (1/B) sum_b [ sum_t m[b,t] l[b,t] / sum_t m[b,t] ]``
    (verl ``agg_loss`` mode ``seq-mean-token-mean``).

    Args:
        loss_mat: (B, T) per-token loss terms.
        response_mask: (B, T) bool or 0/1; every row has a real token.

    Returns:
        0-dim loss.
    """
    return masked_mean(loss_mat, response_mask, dim=-1).mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum", unit="sequence")
def seq_mean_token_sum(loss_mat: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token sum within each response, then the mean over responses.

    Formula: ``L = (1/B) sum_b sum_t m[b,t] l[b,t]`` (verl ``agg_loss`` mode
    ``seq-mean-token-sum``).

    Args:
        loss_mat: (B, T) per-token loss terms.
        response_mask: (B, T) bool or 0/1.

    Returns:
        0-dim loss.
    """
    return masked_sum(loss_mat, response_mask, dim=-1).mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm", unit="sequence")
def seq_mean_token_sum_norm(loss_mat: torch.Tensor, response_mask: torch.Tensor, *,
                            max_new_tokens: int | None) -> torch.Tensor:
    """Dr. GRPO's constant normaliser: token sums over a fixed length, mean over responses.

    Formula: ``L = (1/B) sum_b sum_t m[b,t] l[b,t] / L_max`` with ``L_max`` =
    ``max_new_tokens`` (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2:
    the per-response ``1/|o_i|`` of GRPO is replaced by one constant). verl's mode of
    the same name divides the sum by ``L_max`` without the ``1/B`` (its loss is ours
    times B); the mean keeps this loss on the scale of the other modes, so the same
    KL and entropy coefficients and gradient clip apply.

    Args:
        loss_mat: (B, T) per-token loss terms.
        response_mask: (B, T) bool or 0/1.
        max_new_tokens: L_max (the recipe passes ``rollout.max_new_tokens``); None = T.

    Returns:
        0-dim loss.
    """
    length = max_new_tokens if max_new_tokens is not None else loss_mat.shape[-1]
    return masked_sum(loss_mat, response_mask, dim=-1).mean() / length


def aggregate(loss_mat: torch.Tensor, response_mask: torch.Tensor, loss_agg: str = "token-mean",
              max_new_tokens: int | None = None) -> torch.Tensor:
    """``LOSS_AGGREGATIONS[loss_agg](loss_mat, response_mask, max_new_tokens=...)``: the policy losses' last step
    (a loss passes its own ``loss_agg`` and ``max_new_tokens`` on; the recipe binds them for its other terms)."""
    return bind(LOSS_AGGREGATIONS.get(loss_agg), {"max_new_tokens": max_new_tokens}, 2,
                "algorithm.loss_agg")(loss_mat, response_mask)


def local_units(response_mask: torch.Tensor, loss_agg: str) -> float:
    """What one rank contributes to ``loss_agg``'s denominator: its real tokens, or its responses."""
    if LOSS_AGGREGATIONS.trait(loss_agg, "unit") == "token":
        return float(bool_mask(response_mask).sum())
    return float(response_mask.shape[0])


def rank_share(units: float, all_units: float, world_size: int) -> float:
    """The factor on one rank's local loss that makes DDP's gradient average the global aggregation.

    Formula: with local losses ``L_r = N_r / D_r`` (numerator over this rank's units
    ``D_r``), the global loss is ``sum_r N_r / sum_r D_r``; DDP averages gradients
    (``(1/W) sum_r grad``), so scale ``L_r`` by ``W D_r / sum_r D_r``. 1 on one process,
    and 1 for sequence units when every rank holds the same number of rows.
    """
    return units * world_size / max(all_units, 1.0)
