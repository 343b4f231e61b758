"""RLHF algorithm math: pure tensor functions, selected from registries by name.

- :mod:`.core`: masked statistics, KL estimators, token rewards, KL controllers.
- :mod:`.advantages`: return-to-go + REINFORCE baselines, GAE, n-step TD.
- :mod:`.losses`: policy / value losses, entropy, explained variance.
"""

from rlhf_cli.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    BASELINES,
    discounted_returns,
    gae,
    get_advantage_estimator,
    nstep_advantages,
    reinforce_advantages,
)
from rlhf_cli.algorithms.core import (
    AdaptiveKLController,
    FixedKLController,
    RunningMean,
    bool_mask,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    place_step_rewards,
    token_rewards,
)
from rlhf_cli.algorithms.losses import (
    POLICY_LOSSES,
    entropy_from_logits,
    explained_variance,
    policy_gradient_loss,
    ppo_policy_loss,
    value_loss,
)

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "BASELINES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMean",
    "bool_mask",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "get_advantage_estimator",
    "kl_k1",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "nstep_advantages",
    "place_step_rewards",
    "policy_gradient_loss",
    "ppo_policy_loss",
    "reinforce_advantages",
    "token_rewards",
    "value_loss",
]
from rlhf_cli.algorithms.reward import REWARD_LOSSES, pairwise_loss  # noqa: E402  (train-rm)
