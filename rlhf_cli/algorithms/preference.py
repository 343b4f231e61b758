"""Direct preference losses (issue 31's `rlhf dpo`): a policy trained on preference pairs without a reward model.

Every loss reads per-pair sequence log-probs, each the sum over a response's tokens of log pi(y_t | x, y_<t):

    chosen, rejected          (B,) under the policy being trained
    ref_chosen, ref_rejected  (B,) under the frozen reference (unused by a reference-free loss)
    chosen_tokens, rejected_tokens  (B,) the responses' token counts (length-normalised losses)

and returns (B,) per-pair losses (the recipe averages them). Notation: the implicit rewards
``h_c = chosen - ref_chosen`` and ``h_r = rejected - ref_rejected``, their gap ``d = h_c - h_r``.
Each is checked against TRL 1.12's formula on random tensors (tests/algorithms/test_preference.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.algorithms.registry import Registry

Tensor = torch.Tensor

PREFERENCE_LOSSES = Registry("loss", "(chosen, rejected, ref_chosen, ref_rejected, chosen_tokens, "
                                         "rejected_tokens, *, <keys it reads>) -> (B,) losses", reference_free=False)


def implicit_reward_gap(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """``d = (chosen - ref_chosen) - (rejected - ref_rejected)``, (B,): the gap of the implicit rewards."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, chosen_tokens: Tensor,
                rejected_tokens: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with label smoothing eps (cDPO, Mitchell 2023):
    ``-(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)``; eps = 0 is DPO itself.

    Source: TRL's DPOTrainer `loss_type="sigmoid"` (eps = 0) and the CPOTrainer's `sigmoid` form with
    `label_smoothing` (trl/experimental/cpo/cpo_trainer.py), with the reference's log-ratios.
    Shapes: every input (B,) -> (B,); the token counts are unused.
    """
    d = implicit_reward_gap(chosen, rejected, ref_chosen, ref_rejected)
    return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)


@PREFERENCE_LOSSES.register("ipo")
def ipo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, chosen_tokens: Tensor,
        rejected_tokens: Tensor, *, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17, beta their tau): ``(h_c / L_c - h_r / L_r - 1 / (2 beta))^2``, each implicit
    reward averaged over its response's tokens (L_c, L_r, at least 1), as TRL does after confirming it with the
    authors (the paper's results use the per-token form).

    Source: TRL 1.12 DPOTrainer `loss_type="ipo"`. Shapes: (B,) -> (B,).
    """
    gap = ((chosen - ref_chosen) / chosen_tokens.clamp(min=1) - (rejected - ref_rejected) / rejected_tokens.clamp(min=1))
    return (gap - 1 / (2 * beta)) ** 2


@PREFERENCE_LOSSES.register("simpo", reference_free=True)
def simpo(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
          chosen_tokens: Tensor, rejected_tokens: Tensor, *, beta: float, gamma: float,
          label_smoothing: float) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6): no reference; the length-normalised log-probs with a target margin gamma,
    ``u = beta (chosen / L_c - rejected / L_r) - gamma``, loss ``-(1 - eps) log sigmoid(u) - eps log sigmoid(-u)``.

    Source: TRL's CPOTrainer `loss_type="simpo"` (its logits minus simpo_gamma / beta, times beta; average
    log-probs). Shapes: (B,) -> (B,); the reference inputs are unused (None allowed).
    """
    u = beta * (chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(u) - label_smoothing * F.logsigmoid(-u)


def chosen_nll(chosen: Tensor, tokens: Tensor | int) -> Tensor:
    """The SFT term of RPO (Pang et al. 2024): the chosen responses' negative log-likelihood per token,
    ``-sum_b chosen_b / N`` (scalar), TRL's `loss_type=["sigmoid", "sft"]` second term (the cross-entropy mean over
    every chosen token). tokens: N, the batch's chosen tokens (an int, or (B,) counts summed); a step of several
    micro-batches passes the whole batch's N to each, so their terms add up to the batch's. The recipe adds it
    weighted by `sft_weight`."""
    total = tokens.sum().clamp(min=1) if isinstance(tokens, Tensor) else max(1, tokens)
    return -chosen.sum() / total


def implicit_rewards(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
                     chosen_tokens: Tensor, rejected_tokens: Tensor, *, beta: float,
                     reference_free: bool) -> tuple[Tensor, Tensor]:
    """The rewards a loss compares, (B,) each, for the logs and held-out metrics: DPO's implicit reward
    ``beta (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al. 2023, eq. 5; TRL's `rewards/chosen`), or for a
    reference-free loss SimPO's ``beta / |y| log pi(y|x)`` (Meng et al. 2024, eq. 4). A pair is ranked right when
    the chosen one's is higher; their gap is the reward margin (TRL's `rewards/margins`)."""
    if reference_free:
        return beta * chosen / chosen_tokens.clamp(min=1), beta * rejected / rejected_tokens.clamp(min=1)
    return beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
