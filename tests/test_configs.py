"""Every shipped config composes and validates against the schema (torchtune's test_configs)."""

import pytest

from rlhf_cli.commands.compose import CONF_DIR, compose_config
from rlhf_cli.config import PPO_EPOCHS, AlgorithmConfig, RLConfig, SFTConfig
from rlhf_cli.errors import ConfigError

GROUP_OPTIONS = {
    "sft": {"model": ["tiny"], "data": ["embedded"], "device": ["auto", "cpu", "cuda"]},
    "rl": {"algorithm": ["reinforce", "a2c", "ppo"], "reward": ["rule"], "device": ["auto", "cpu"]},
}


def test_every_primary_config_composes():
    for primary in CONF_DIR.glob("*.yaml"):
        stage = primary.stem.replace("_", "-")
        cfg = compose_config(stage, [])
        assert cfg.output_dir.startswith("runs/")


@pytest.mark.parametrize("stage,group,option", [(s, g, o) for s, groups in GROUP_OPTIONS.items()
                                                for g, opts in groups.items() for o in opts])
def test_every_group_option_composes(stage, group, option):
    """Every value the option's file sets reaches the composed config (under the group's key)."""
    from omegaconf import OmegaConf

    cfg = compose_config(stage, [f"{group}={option}"])
    values = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    assert values, f"{group}/{option}.yaml sets nothing"
    resolved = {("algorithm", "epochs"): PPO_EPOCHS}  # null in the file: resolved while composing (sync here)
    for key, value in values.items():
        expected = resolved[group, key] if value is None and (group, key) in resolved else value
        assert getattr(getattr(cfg, group), key) == expected, key


def test_every_group_file_is_covered_or_needs_a_value():
    """Options not composed above need a user value (???), e.g. reward=rm needs reward.model.path."""
    for group_dir in (d for d in CONF_DIR.iterdir() if d.is_dir()):
        for option in group_dir.glob("*.yaml"):
            covered = any(option.stem in groups.get(group_dir.name, []) for groups in GROUP_OPTIONS.values())
            assert covered or "???" in option.read_text(), option


def test_rm_reward_composes_with_a_path():
    cfg = compose_config("rl", ["reward=rm", "reward.model.path=/some/rm"])
    assert cfg.reward.functions == [] and cfg.reward.model.path == "/some/rm"


def test_algorithm_configs_match_their_algorithm():
    from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES

    assert sorted(p.stem for p in (CONF_DIR / "algorithm").glob("*.yaml")) == sorted(POLICY_LOSSES)
    for name in POLICY_LOSSES:  # one YAML per registered policy loss, naming it
        cfg = compose_config("rl", [f"algorithm={name}"])
        assert cfg.algorithm.name == name and cfg.algorithm.advantage in ADVANTAGE_ESTIMATORS
        assert cfg.algorithm.needs_critic == (name != "reinforce") == POLICY_LOSSES.trait(name, "needs_critic")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="needs a critic"):
        RLConfig(algorithm=AlgorithmConfig(name="ppo", advantage="reinforce"), reward=_rule())
    with pytest.raises(ConfigError, match="does not divide"):
        RLConfig(algorithm=AlgorithmConfig(name="ppo", advantage="gae", minibatches=3), reward=_rule())
    with pytest.raises(ConfigError, match="no reward source"):
        RLConfig()
    with pytest.raises(ConfigError, match="optim.lr"):
        compose_config("sft", ["optim.lr=-1"])
    assert SFTConfig().max_steps > 0


def _rule():
    from rlhf_cli.config import RewardConfig

    return RewardConfig(functions=["rlhf_cli.task:correctness_reward"])


@pytest.mark.parametrize("overrides, coef", [
    (["reward=rule"], 0.05),                                            # rule rewards alone
    (["reward=rm", "reward.model.path=/some/rm"], 0.2),                 # a learned RM alone: stronger KL
    (["reward=rule_rm", "reward.model.path=/some/rm"], 0.2),            # any RM in the reward
    (["reward=rm", "reward.model.path=/some/rm", "kl.coef=0.01"], 0.01),  # a set value always wins
])
def test_kl_coef_defaults_by_reward_source(overrides, coef):
    from dataclasses import asdict

    from rlhf_cli.config import KLConfig

    assert KLConfig().coef is None  # null in the schema: resolved once the reward sources are known
    cfg = compose_config("rl", overrides)
    assert cfg.kl.coef == coef and asdict(cfg)["kl"]["coef"] == coef  # the saved config holds the value in force


@pytest.mark.parametrize("overrides, epochs", [
    (["algorithm=ppo"], 2),                                                              # sync
    (["algorithm=ppo", "rollout.mode=async"], 1),                                        # a lag of 1 by default
    (["algorithm=ppo", "rollout.mode=async", "rollout.max_lag=0"], 2),                   # no lag: sync's updates
    (["algorithm=ppo", "rollout.mode=async", "algorithm.epochs=3"], 3),                  # a set value always wins
    (["algorithm=a2c", "rollout.mode=async"], 1),                                        # one pass anyway
])
def test_ppo_epochs_default_by_staleness(overrides, epochs):
    from dataclasses import asdict

    cfg = compose_config("rl", overrides)
    assert cfg.algorithm.epochs == epochs and asdict(cfg)["algorithm"]["epochs"] == epochs


@pytest.mark.parametrize("overrides, on", [
    (["reward=rule"], True),                                                    # rule rewards alone: redraw ties
    (["reward=rm", "reward.model.path=/some/rm"], False),                       # an RM scores: off
    (["reward=rule_rm", "reward.model.path=/some/rm"], False),
    (["reward=rule", "rollout.mode=async"], False),                             # not supported in async yet
    (["reward=rule", "rollout.samples_per_prompt=1", "algorithm.baseline=mean"], False),  # no group to compare
    (["reward=rm", "reward.model.path=/some/rm", "algorithm.dynamic_sampling=true"], True),  # a set value wins
])
def test_dynamic_sampling_default_by_reward_source(overrides, on):
    from dataclasses import asdict

    assert AlgorithmConfig().dynamic_sampling is None  # null in the schema: resolved once the sources are known
    cfg = compose_config("rl", overrides)
    assert cfg.algorithm.dynamic_sampling is on and asdict(cfg)["algorithm"]["dynamic_sampling"] is on
