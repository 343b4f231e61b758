"""Core RLHF tensor math: masked statistics, KL estimators, token rewards, KL controllers.

Pure functions of tensors and plain numbers. Shapes use
B = responses in the rollout batch, T = response tokens (padded).
``response_mask`` is (B, T), bool or float, 1 on real response tokens: a
prefix of each row, up to and including the stop token. Every function
works on the device and dtype of its inputs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rlhf_cli.algorithms.offpolicy import truncated_importance_weights
from rlhf_cli.algorithms.registry import Registry

Dim = int | tuple[int, ...] | None


def bool_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool view of a 0/1 mask (bool or float)."""
    return mask if mask.dtype == torch.bool else mask != 0


# ---------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``x`` over entries where ``mask == 1``.

    Formula: ``sum_i x_i [mask_i = 1]``. Padded entries are replaced by 0
    before summing (``torch.where``), so even inf/NaN there cannot leak in.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (or broadcastable), bool or 0/1 float.
        dim: dimension(s) to reduce; ``None`` reduces everything to a 0-dim tensor.

    Returns:
        ``x`` reduced over ``dim``, e.g. (B,) for ``dim=-1``, 0-dim for ``None``.
    """
    x_real = torch.where(bool_mask(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if dim is None:
        return x_real.sum()
    return x_real.sum(dim=dim)


def _masked_count(x: torch.Tensor, mask: torch.Tensor, dim: Dim) -> torch.Tensor:
    """Number of real entries (in ``x``'s dtype), broadcast to ``x``'s shape first."""
    count = bool_mask(mask).expand_as(x).to(x.dtype)
    return count.sum() if dim is None else count.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask == 1``.

    Formula: ``sum_i x_i m_i / max(sum_i m_i, 1)``. An empty selection
    (e.g. a row with no real token when ``dim=-1``) gives 0, not NaN.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x`` (or broadcastable), bool or 0/1 float.
        dim: dimension(s) to reduce; ``None`` gives a 0-dim tensor.

    Returns:
        ``x`` averaged over ``dim``: (B,) for ``dim=-1`` on (B, T), 0-dim for ``None``.
    """
    count = _masked_count(x, mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask == 1``.

    Formula: ``var = sum_i m_i (x_i - mean)^2 / n``, times Bessel's
    correction ``n / (n - 1)`` when ``unbiased`` (n = number of real
    entries). With a single real entry the correction is skipped (result 0)
    instead of dividing by zero; no host sync is needed.

    Args:
        x: any shape, e.g. (B, T).
        mask: same shape as ``x``, bool or 0/1 float.
        unbiased: apply Bessel's correction.

    Returns:
        0-dim tensor.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = _masked_count(x, mask, None)
        variance = variance * count / (count - 1).clamp(min=1)
    return variance


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    unbiased: bool = True,
) -> torch.Tensor:
    """Normalise ``x`` to mean 0 and std 1 over real entries only.

    Formula: ``(x - mean) / sqrt(var + eps)`` with mean and (unbiased by
    default) variance from :func:`masked_mean` / :func:`masked_var`. With
    ``shift_mean=False`` the mean is added back (scale only), as in
    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"
    (reward whitening keeps the mean). Padded entries are set to 0.

    Args:
        x: (B, T) e.g. advantages.
        mask: (B, T) response_mask.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance for stability.
        unbiased: use the unbiased variance (matches ``torch.std`` default).

    Returns:
        (B, T) whitened ``x``, 0 on padding.
    """
    mean = masked_mean(x, mask)
    variance = masked_var(x, mask, unbiased=unbiased)
    whitened = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(bool_mask(mask), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ---------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL Divergence", 2020)
# ---------------------------------------------------------------------------
# Chosen by kl.estimator; every entry is kl(logprobs, logprobs_ref) -> (B, T). Trait in_reward:
# the penalty is a per-token reward (True) or a term of the loss (False).
KL_ESTIMATORS = Registry("kl.estimator", "(logprobs, logprobs_ref) -> (B, T) per-token KL", in_reward=False)


@KL_ESTIMATORS.register("k1", in_reward=True)
def kl_k1(logprobs: torch.Tensor, logprobs_ref: torch.Tensor) -> torch.Tensor:
    """Per-token naive KL estimator k1.

    Formula: ``k1[t] = logp[t] - logp_ref[t]``; unbiased for
    KL(pi || pi_ref) when tokens are sampled from pi, may be negative per
    token (Schulman 2020, "Approximating KL Divergence"; used in the
    reward by Ziegler et al. 2019).

    Args:
        logprobs: (B, T) log-probs of sampled tokens under the policy.
        logprobs_ref: (B, T) the same under the frozen reference.

    Returns:
        (B, T); not masked (apply ``response_mask`` downstream).
    """
    return logprobs - logprobs_ref


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, logprobs_ref: torch.Tensor) -> torch.Tensor:
    """Per-token low-variance KL estimator k3, always >= 0.

    Formula: with ``log_ratio = logp_ref - logp``,
    ``k3[t] = exp(log_ratio) - log_ratio - 1`` (Schulman 2020,
    "Approximating KL Divergence"; unbiased for KL(pi || pi_ref) under
    samples from pi, and >= 0 since e^u >= 1 + u).

    Args:
        logprobs: (B, T) log-probs of sampled tokens under the policy.
        logprobs_ref: (B, T) the same under the frozen reference.

    Returns:
        (B, T); not masked.
    """
    log_ratio = logprobs_ref - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, logprobs_ref: torch.Tensor) -> torch.Tensor:
    """Per-token squared-log-ratio KL estimator k2 ("mse"), always >= 0.

    Formula: ``k2[t] = 0.5 * (logp[t] - logp_ref[t])^2`` (Schulman 2020,
    "Approximating KL Divergence"; verl ``kl_penalty`` modes ``mse`` / ``k2``).
    Biased as a value (it is KL's second-order approximation, close while the
    policy stays near the reference), but as a loss term its gradient,
    ``(logp - logp_ref) grad logp``, is in expectation the exact gradient of
    KL(pi || pi_ref) under samples from pi; k3's gradient is not (in expectation,
    ``(1 - pi_ref/pi) grad logp``: the gradient of KL(pi_ref || pi), the other direction). Wise when the penalty must pull the
    right way, e.g. a large beta on a long run; k3 when the logged KL value matters.

    Args:
        logprobs: (B, T) log-probs of sampled tokens under the policy.
        logprobs_ref: (B, T) the same under the frozen reference.

    Returns:
        (B, T); not masked.
    """
    return 0.5 * (logprobs - logprobs_ref) ** 2


@KL_ESTIMATORS.register("k3_clamped")
def kl_k3_clamped(logprobs: torch.Tensor, logprobs_ref: torch.Tensor) -> torch.Tensor:
    """k3 with verl's clamps (verl ``kl_penalty`` mode ``low_var_kl`` / ``k3``).

    Formula: ``u = clamp(logp_ref - logp, -20, 20)``,
    ``k3c[t] = clamp(exp(u) - u - 1, -10, 10)``. Equal to :func:`kl_k3` while
    ``-11 <= u <= 2.6`` (where k3 <= 10); past that the value stays at 10 and its gradient is 0, so one token
    whose reference log-prob is far above the policy's (``exp(u)`` explodes) cannot
    dominate the loss or overflow in bf16. Wise with low-precision log-probs or a
    policy that has drifted far; it drops the penalty's pull exactly on the tokens that
    drifted most, so prefer plain k3 (or k2) when the run stays near the reference.

    Args:
        logprobs: (B, T) log-probs of sampled tokens under the policy.
        logprobs_ref: (B, T) the same under the frozen reference.

    Returns:
        (B, T); not masked.
    """
    log_ratio = torch.clamp(logprobs_ref - logprobs, min=-20.0, max=20.0)
    return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10.0, max=10.0)


# ---------------------------------------------------------------------------
# Token rewards
# ---------------------------------------------------------------------------


def token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    step_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards: KL penalty on every real token, score on the last one.

    Formula (Ziegler et al. 2019; Stiennon et al. 2020):
    ``r[b,t] = -kl_coef * kl[b,t] + step_rewards[b,t]`` on real tokens, plus
    ``scores[b]`` at ``t = L_b - 1`` with ``L_b = sum_t response_mask[b,t]``;
    exactly 0 on padding. Hence
    ``sum_t r[b,t] = scores[b] - kl_coef * sum_t kl[b,t] + sum_t step_rewards[b,t]``
    (sums over real tokens).

    Every row must have at least one real token (callers guarantee it: a
    response contains at least its stop token or one sampled token);
    a ValueError is raised otherwise, since the score would have nowhere to go.

    Args:
        scores: (B,) sequence scores.
        kl: (B, T) per-token KL estimate (usually :func:`kl_k1`).
        response_mask: (B, T) bool or 0/1, a prefix of each row.
        kl_coef: beta, the KL penalty coefficient.
        step_rewards: optional (B, T) process rewards already placed at
            step ends (see :func:`place_step_rewards`).

    Returns:
        (B, T) rewards in ``kl``'s dtype and device.
    """
    real = bool_mask(response_mask)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = -kl_coef * kl
    if step_rewards is not None:
        rewards = rewards + step_rewards.to(kl.dtype)
    rewards = torch.where(real, rewards, zero)
    lengths = real.sum(dim=-1)  # (B,)
    if bool((lengths == 0).any()):  # one sync per rollout batch; a clear error beats a device assert
        raise ValueError("token_rewards: every response needs at least one real token (a row of response_mask is all 0)")
    last_index = (lengths - 1).unsqueeze(-1)  # (B, 1)
    return rewards.scatter_add(-1, last_index, scores.to(kl.dtype).unsqueeze(-1))


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer_length: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13): a length-aware penalty on the score.

    Formula, with ``L_max = max_length``, ``L_cache = buffer_length``, ``|y|`` the response length:
    ``0`` if ``|y| <= L_max - L_cache``; ``((L_max - L_cache) - |y|) / L_cache`` inside the last
    ``L_cache`` tokens (0 down to -1); ``-1`` past ``L_max``. A response cut by the length limit
    is then told so gradually instead of being scored as if it were finished (or zeroed).
    verl's DAPO reward manager computes the same (``-exceed_len / overlong_buffer_len``, times its
    ``penalty_factor``).

    Args:
        lengths: (B,) response lengths in tokens (the stop token included).
        max_length: L_max, the response length limit.
        buffer_length: L_cache, 1 <= L_cache <= L_max.

    Returns:
        (B,) penalties in [-1, 0], in ``lengths``' float dtype (float32 for integer lengths).
    """
    if not 1 <= buffer_length <= max_length:
        raise ValueError(f"overlong_penalty needs 1 <= buffer_length <= max_length, got {buffer_length}, {max_length}")
    lengths = lengths if lengths.is_floating_point() else lengths.float()
    return torch.clamp(((max_length - buffer_length) - lengths) / buffer_length, min=-1.0, max=0.0)


def place_step_rewards(
    step_values: Sequence[Sequence[float]],
    step_end_positions: Sequence[Sequence[int]],
    shape: tuple[int, int] | torch.Size,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Scatter process rewards (one value per reasoning step) onto token positions.

    Formula: ``out[b, p] = sum_{s : end_s = p} value_s`` where ``end_s`` is
    the index (within the response) of the last token of step ``s`` of
    response ``b`` (process supervision, Lightman et al. 2023; dense credit
    assignment). Values at equal positions add up.

    Args:
        step_values: B lists, the reward of each step of response b.
        step_end_positions: B lists of the same lengths, token index
            (0 <= p < T) of the last token of each step.
        shape: (B, T).
        device, dtype: of the result.

    Returns:
        (B, T) tensor, 0 except at step ends.
    """
    batch_size, num_tokens = shape
    if len(step_values) != batch_size or len(step_end_positions) != batch_size:
        raise ValueError(
            f"place_step_rewards: expected {batch_size} rows, got {len(step_values)} value lists "
            f"and {len(step_end_positions)} position lists"
        )
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, (row_values, row_positions) in enumerate(zip(step_values, step_end_positions)):
        if len(row_values) != len(row_positions):
            raise ValueError(
                f"place_step_rewards: row {row} has {len(row_values)} step values but {len(row_positions)} positions"
            )
        for value, position in zip(row_values, row_positions):
            if not 0 <= position < num_tokens:
                raise ValueError(f"place_step_rewards: row {row} position {position} outside [0, {num_tokens})")
            rows.append(row)
            cols.append(int(position))
            values.append(float(value))
    out = torch.zeros(batch_size, num_tokens, device=device, dtype=dtype)
    if rows:
        index = (
            torch.tensor(rows, device=out.device, dtype=torch.long),
            torch.tensor(cols, device=out.device, dtype=torch.long),
        )
        out.index_put_(index, torch.tensor(values, device=out.device, dtype=dtype), accumulate=True)
    return out


# ---------------------------------------------------------------------------
# KL coefficient controllers and running statistics (plain python state)
# ---------------------------------------------------------------------------


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", eq. 2).

    Update: ``e = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``. KL above target
    raises beta, below lowers it, by at most 20% per ``horizon`` steps.

    Args:
        init_kl_coef: starting beta.
        target: the KL (nats per sequence, as measured by the caller) to track.
        horizon: number of steps (e.g. samples) over which the full correction applies.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=} {horizon=}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta towards the target; returns the new value."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient with the :class:`AdaptiveKLController` interface; ``update`` is a no-op."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMean:
    """Cumulative mean of sequence returns, the 'mean' REINFORCE baseline (Williams 1992, reinforcement baseline).

    Formula: after seeing samples ``s_1..s_n`` across batches,
    ``value = (1/n) sum_i s_i``; ``count`` = n. ``value`` is 0.0 until the
    first update (check ``count``).
    """

    def __init__(self) -> None:
        self.value = 0.0
        self.count = 0

    def update(self, values: torch.Tensor | Sequence[float]) -> float:
        """Fold a batch of sequence returns ((N,) tensor or floats) into the mean; returns the new mean."""
        values = torch.as_tensor(values).detach().reshape(-1)
        n = int(values.numel())
        if n == 0:
            return self.value
        batch_sum = float(values.double().sum().item())  # a python float is the natural result of a running stat
        self.value = (self.value * self.count + batch_sum) / (self.count + n)
        self.count += n
        return self.value

    def state_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "count": self.count}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.value = float(state["value"])
        self.count = int(state["count"])


def truncated_is_weights(logprobs_train: torch.Tensor, logprobs_behaviour: torch.Tensor, mask: torch.Tensor,
                         cap: float | None) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Truncated importance sampling for a rollout engine whose numerics differ from training's (Yao et
    al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; TRL's
    ``vllm_importance_sampling_correction``, cap 2.0).

    Formula: ``w_t = min(exp(log pi_train(y_t) - log pi_engine(y_t)), C)``, detached; the policy-gradient
    term of token t is multiplied by ``w_t`` (as a positive factor of the advantage, it passes through
    PPO's min / clip unchanged). Tokens were drawn from pi_engine, the gradient is of pi_train: w
    reweights them to pi_train's distribution, and the cap C bounds the variance a rare token with a
    large ratio would bring.

    Args:
        logprobs_train: (B, T) log-probs of the sampled tokens under the training model (old log-probs).
        logprobs_behaviour: (B, T) the engine's log-probs of the same tokens, at sampling time.
        mask: (B, T) response mask.
        cap: C >= 1, or None: no weights (the stats are still returned).

    Returns:
        (weights (B, T), 0 on padding, or None without a cap; stats: ``rollout_logprob_diff`` (mean
        |difference| per token), ``rollout_logprob_diff_max``, and with a cap ``is_weight`` (mean) and
        ``is_clip_frac`` (tokens whose ratio exceeded C)).
    """
    mask = mask.float()
    diff = (logprobs_train - logprobs_behaviour).detach() * mask
    stats = {"rollout_logprob_diff": masked_mean(diff.abs(), mask),
             "rollout_logprob_diff_max": (diff.abs() * mask).max() if mask.numel() else diff.new_zeros(())}
    if cap is None:
        return None, stats
    weights = truncated_importance_weights(logprobs_train, logprobs_behaviour, mask, cap)  # the async correction's
    stats |= {"is_weight": masked_mean(weights, mask),
              "is_clip_frac": masked_mean((diff > math.log(cap)).float(), mask)}
    return weights, stats
