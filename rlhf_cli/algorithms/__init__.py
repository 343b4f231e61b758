"""RLHF algorithm math: pure tensor functions, selected from registries by name.

- :mod:`.core`: masked statistics, KL estimators (``KL_ESTIMATORS``), token rewards, KL controllers.
- :mod:`.advantages`: return-to-go + REINFORCE baselines (``BASELINES``), GAE, n-step TD (``ADVANTAGE_ESTIMATORS``).
- :mod:`.aggregation`: loss aggregation over tokens and responses (``LOSS_AGGREGATIONS``).
- :mod:`.losses`: policy losses (``POLICY_LOSSES``), value loss, entropy, explained variance.
- :mod:`.turns`: multi-turn episodes' environment tokens taken off the time axis (pack / unpack).
- :mod:`.offpolicy`: truncated importance weights and V-trace (rollout.mode=async).
- :mod:`.reward`: the reward model's pairwise loss (train-rm).
- :mod:`.preference`: direct preference losses (``PREFERENCE_LOSSES``: DPO / cDPO, IPO, SimPO) and RPO's SFT term.
- :mod:`.registry`: the Registry the ones above are made of, and ``bind`` (an entry's config keys, bound once).

Nothing here imports the rest of the project: tensors in, tensors out.
"""

from rlhf_cli.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    BASELINES,
    GROUP_STD_EPS,
    discounted_returns,
    gae,
    group_mean,
    group_norm,
    group_norm_unbiased,
    leave_one_out,
    no_baseline,
    nstep_advantages,
    reinforce_advantages,
    running_mean_baseline,
)
from rlhf_cli.algorithms.aggregation import LOSS_AGGREGATIONS, aggregate, local_units, rank_share
from rlhf_cli.algorithms.core import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMean,
    bool_mask,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_k3_clamped,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    overlong_penalty,
    place_step_rewards,
    token_rewards,
    truncated_is_weights,
)
from rlhf_cli.algorithms.losses import (
    POLICY_LOSSES,
    entropy_from_logits,
    explained_variance,
    policy_gradient_loss,
    ppo_policy_loss,
    value_loss,
)
from rlhf_cli.algorithms.offpolicy import truncated_importance_weights, vtrace
from rlhf_cli.algorithms.preference import PREFERENCE_LOSSES, chosen_nll, implicit_reward_gap, implicit_rewards
from rlhf_cli.algorithms.registry import Registry, bind, reads
from rlhf_cli.algorithms.reward import pairwise_loss
from rlhf_cli.algorithms.turns import pack, pack_index, unpack

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "BASELINES",
    "GROUP_STD_EPS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "implicit_rewards",
    "AdaptiveKLController",
    "FixedKLController",
    "Registry",
    "RunningMean",
    "aggregate",
    "bool_mask",
    "chosen_nll",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "bind",
    "gae",
    "group_mean",
    "group_norm",
    "group_norm_unbiased",
    "implicit_reward_gap",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_k3_clamped",
    "leave_one_out",
    "local_units",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "no_baseline",
    "nstep_advantages",
    "overlong_penalty",
    "pack",
    "pack_index",
    "pairwise_loss",
    "place_step_rewards",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "rank_share",
    "reads",
    "reinforce_advantages",
    "running_mean_baseline",
    "token_rewards",
    "truncated_is_weights",
    "truncated_importance_weights",
    "unpack",
    "value_loss",
    "vtrace",
]
