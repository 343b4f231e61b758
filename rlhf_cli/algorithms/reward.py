"""Reward-model loss: the pairwise Bradley-Terry objective on preference pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | None = None,
                  center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss with an optional margin and reward centering.

        loss = mean_i[ -log sigmoid(r_c,i - r_r,i - m_i) ] + center_coef * mean_i[ (r_c,i + r_r,i)^2 ]

    The first term is the negative log-likelihood of "chosen beats rejected"
    under the Bradley-Terry model (Ouyang et al. 2022, eq. 1); the margin m
    asks for a gap of at least m (Llama 2, Touvron et al. 2023, eq. 2); the
    centering term pulls the scores toward mean zero (Eisenstein et al. 2023),
    as TRL's ``center_rewards_coefficient``.

    Args:
        chosen_scores: (B,) scalar rewards r_c of the preferred responses.
        rejected_scores: (B,) scalar rewards r_r of the dispreferred responses.
        margin: (B,) required gap m per pair, or None for m = 0.
        center_coef: weight of the centering term (0 = off).

    Returns:
        (loss: scalar, stats: detached scalars ``bt_loss``, ``center_loss``,
        ``accuracy`` (fraction with r_c > r_r) and ``margin`` (mean r_c - r_r)).
    """
    gap = chosen_scores - rejected_scores  # (B,)
    shifted = gap - margin.to(gap) if margin is not None else gap
    bt_loss = -F.logsigmoid(shifted).mean()  # logsigmoid: stable for large |gap|
    center_loss = ((chosen_scores + rejected_scores) ** 2).mean()
    loss = bt_loss + center_coef * center_loss if center_coef else bt_loss
    stats = {"bt_loss": bt_loss.detach(), "center_loss": center_loss.detach(),
             "accuracy": (gap > 0).float().mean().detach(), "margin": gap.mean().detach()}
    return loss, stats

