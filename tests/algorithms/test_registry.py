"""The registries are real: one signature per registry, the config's choices are their keys, and a new
advantage estimator or policy loss is one decorated function plus its YAML (no edit to the recipe or config)."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

from conftest import REPO, run_cli
from helpers import load_weights, read_metrics
from rlhf_cli.algorithms import (ADVANTAGE_ESTIMATORS, BASELINES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES,
                                 Registry)

SIGNATURES = {  # the leading arguments every entry takes; after them, keywords the recipe binds (registry.bind)
    "POLICY_LOSSES": (POLICY_LOSSES, ["logprobs", "logprobs_old", "advantages", "response_mask"]),
    "ADVANTAGE_ESTIMATORS": (ADVANTAGE_ESTIMATORS, ["rewards", "values", "response_mask", "scores"]),
    "BASELINES": (BASELINES, ["returns", "rewards", "response_mask", "scores"]),
    "KL_ESTIMATORS": (KL_ESTIMATORS, ["logprobs", "logprobs_ref"]),
    "LOSS_AGGREGATIONS": (LOSS_AGGREGATIONS, ["loss_mat", "response_mask"]),
}
RUN_KEYS = {"max_new_tokens", "group_size", "running_mean", "eps"}  # what the recipe binds beside the config's


@pytest.mark.parametrize("registry", sorted(SIGNATURES))
def test_every_entry_of_a_registry_takes_the_same_arguments_then_keys_by_name(registry):
    from dataclasses import fields

    from rlhf_cli.config import AlgorithmConfig

    entries, leading = SIGNATURES[registry]
    keys = {f.name for f in fields(AlgorithmConfig)} | RUN_KEYS
    for name, fn in entries.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:len(leading)]] == leading, name
        assert all(p.kind in (p.POSITIONAL_OR_KEYWORD,) for p in params[:len(leading)]), name
        # nothing swallows a misspelt key, and every later parameter is a keyword the recipe can bind
        assert not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params), name
        assert {p.name for p in params[len(leading):]} <= keys, name


def test_every_loss_estimator_and_baseline_binds_and_runs_through_the_recipes_call():
    """The recipe's binding, verbatim, on a small batch: every entry answers it."""
    import dataclasses

    from rlhf_cli.algorithms import RunningMean, bind, reinforce_advantages
    from rlhf_cli.config import AlgorithmConfig

    torch.manual_seed(0)
    B, T = 4, 5
    mask = torch.ones(B, T)
    keys = dataclasses.asdict(AlgorithmConfig()) | {"max_new_tokens": T, "group_size": 2, "running_mean": RunningMean()}
    for name in ADVANTAGE_ESTIMATORS:
        estimate = bind(ADVANTAGE_ESTIMATORS.get(name), keys, 4, "algorithm.advantage")
        advantages, returns = estimate(torch.randn(B, T), torch.randn(B, T), mask, torch.randn(B))
        assert advantages.shape == returns.shape == (B, T), name
    for name in BASELINES:
        advantages, _ = reinforce_advantages(torch.randn(B, T), None, mask, torch.randn(B), gamma=1.0, baseline=name,
                                             group_size=2, running_mean=RunningMean())
        assert advantages.shape == (B, T) and torch.isfinite(advantages).all(), name
    for name in POLICY_LOSSES:
        loss_fn = bind(POLICY_LOSSES.get(name), keys, 4, "algorithm.name")
        logprobs = torch.randn(B, T, requires_grad=True)
        loss, stats = loss_fn(logprobs, logprobs.detach() + 0.1, torch.randn(B, T), mask)
        loss.backward()
        assert loss.dim() == 0 and isinstance(stats, dict) and logprobs.grad is not None, name


def test_bind_refuses_a_parameter_no_key_supplies_and_a_catch_all():
    """A loss written with `clip_hi` would run at its default while algorithm.clip_high goes unread: refused,
    defaulted or not, naming the parameter and the keys there are; so is **kwargs, which hides any such slip."""
    from rlhf_cli.algorithms import bind

    def misspelt(logprobs, logprobs_old, advantages, response_mask, *, clip_hi=0.2):
        return clip_hi

    def catch_all(logprobs, logprobs_old, advantages, response_mask, **hparams):
        return hparams

    def right(logprobs, logprobs_old, advantages, response_mask, *, clip_high):
        return clip_high

    keys = {"clip_low": 0.1, "clip_high": 0.3}
    with pytest.raises(ValueError, match=r"algorithm.name: .*misspelt names 'clip_hi', which no config key .* "
                                          r"one of: clip_high, clip_low"):
        bind(misspelt, keys, 4, "algorithm.name")
    with pytest.raises(ValueError, match=r"takes \*hparams"):
        bind(catch_all, keys, 4, "algorithm.name")
    assert bind(right, keys, 4, "algorithm.name")(None, None, None, None) == 0.3


def test_the_config_offers_exactly_the_registered_names():
    from rlhf_cli.config import AlgorithmConfig, KLConfig
    from rlhf_cli.errors import ConfigError

    for registry, make in ((POLICY_LOSSES, lambda v: AlgorithmConfig(name=v, advantage="gae")),
                           (ADVANTAGE_ESTIMATORS, lambda v: AlgorithmConfig(advantage=v)),
                           (LOSS_AGGREGATIONS, lambda v: AlgorithmConfig(loss_agg=v)),
                           (KL_ESTIMATORS, lambda v: KLConfig(estimator=v))):
        for name in registry:
            make(name)
        with pytest.raises(ConfigError, match="is not one of " + ", ".join(registry)):
            make("nosuch")


def test_a_registry_refuses_a_second_entry_of_one_name_and_unknown_traits():
    registry = Registry("thing.kind", "(x) -> y", fast=False)
    registry.register("a", fast=True)(lambda x: x)
    assert registry.trait("a", "fast") is True
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(lambda x: x)
    with pytest.raises(TypeError, match="unknown trait"):
        registry.register("b", slow=True)
    with pytest.raises(ValueError, match="unknown thing.kind 'c'; valid: a"):
        registry.get("c")


PLUGIN = '''
"""A new advantage estimator, policy loss and REINFORCE baseline, registered as a contributor would write them
in rlhf_cli/algorithms/ (here loaded at start-up by sitecustomize, so the package itself stays unedited)."""
import torch
from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, BASELINES, POLICY_LOSSES, discounted_returns, masked_mean


@ADVANTAGE_ESTIMATORS.register("batch_mean")
def batch_mean(rewards, values, response_mask, scores=None, *, gamma):
    returns = discounted_returns(rewards, response_mask, gamma)
    return (returns - returns[:, 0].mean()) * response_mask, returns


@POLICY_LOSSES.register("scaled_pg")
def scaled_pg(logprobs, logprobs_old, advantages, response_mask, *, entropy_coef):
    scale = 0.5 + entropy_coef  # reads a config key by naming it
    loss = -scale * masked_mean(advantages.detach() * logprobs, response_mask)
    return loss, {"adv_abs_mean": masked_mean(advantages.abs(), response_mask).detach()}


@BASELINES.register("best_of_others", compares_group=True)
def best_of_others(returns, rewards, response_mask, scores, *, group_size):
    grouped = returns[:, 0].view(-1, group_size)
    others = grouped.unsqueeze(1).expand(-1, group_size, -1).masked_fill(torch.eye(group_size, dtype=torch.bool), -1e9)
    return returns - others.max(-1).values.reshape(-1, 1)
'''

MISSPELT = '''
from rlhf_cli.algorithms import POLICY_LOSSES, masked_mean


@POLICY_LOSSES.register("clipped_pg")
def clipped_pg(logprobs, logprobs_old, advantages, response_mask, *, clip_hi=0.2):  # algorithm.clip_high misspelt
    return -masked_mean(advantages.clamp(max=clip_hi) * logprobs, response_mask), {}
'''

YAML = """# A policy-gradient loss at half strength with a batch-mean baseline.
#   rlhf rl algorithm=scaled_pg
name: scaled_pg
advantage: batch_mean
epochs: 1
minibatches: 1
"""


def _plugin_run(tmp_path, tiny_model_dir, code: str, *overrides: str):
    plugin = tmp_path / "plugin"
    plugin.mkdir(parents=True)
    (plugin / "sitecustomize.py").write_text(code)
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "algorithm" / "scaled_pg.yaml").write_text(YAML)
    (conf / "algorithm" / "clipped_pg.yaml").write_text(YAML.replace("scaled_pg", "clipped_pg").replace(
        "batch_mean", "reinforce"))
    out = tmp_path / "run"
    proc = run_cli("rl", f"policy.path={tiny_model_dir}", f"output_dir={out}", "max_steps=2",
                   "reward.functions=[rlhf_cli.task:correctness_reward]", "rollout.prompts_per_step=2",
                   "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "data.num_train=8", "data.num_eval=2",
                   "eval.max_new_tokens=4", "device=cpu", "device.threads=1", *overrides, cwd=tmp_path,
                   env={"PYTHONPATH": str(plugin), "RLHF_CONF_DIR": str(conf)})
    return proc, out


def test_adding_an_estimator_and_a_loss_is_one_decorated_function_each_plus_a_yaml(tmp_path, tiny_model_dir):
    proc, out = _plugin_run(tmp_path, tiny_model_dir, PLUGIN, "algorithm=scaled_pg")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rl: scaled_pg (batch_mean)" in proc.stdout + proc.stderr
    train = read_metrics(out, "train")
    assert [r["step"] for r in train] == [1, 2] and all("adv_abs_mean" in r for r in train)  # the loss's own stat
    assert json.loads((out / "config.json").read_text())["algorithm"]["advantage"] == "batch_mean"
    assert "final" in {p.name for p in out.iterdir()} and load_weights(out).keys() == load_weights(tiny_model_dir).keys()


def test_adding_a_baseline_is_one_decorated_function(tmp_path, tiny_model_dir):
    proc, out = _plugin_run(tmp_path, tiny_model_dir, PLUGIN, "algorithm.baseline=best_of_others")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rl: reinforce (reinforce, baseline best_of_others)" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(out, "train")] == [1, 2]
    # compares_group: the config refuses it with one sample a prompt, as it does rloo
    proc, _ = _plugin_run(tmp_path / "k1", tiny_model_dir, PLUGIN, "algorithm.baseline=best_of_others",
                          "rollout.samples_per_prompt=1", "algorithm.dynamic_sampling=false")
    assert proc.returncode == 2 and "algorithm.baseline=best_of_others needs rollout.samples_per_prompt >= 2" in proc.stderr


def test_a_misspelt_key_in_a_registered_loss_is_one_error_before_any_model_loads(tmp_path, tiny_model_dir):
    proc, out = _plugin_run(tmp_path, tiny_model_dir, MISSPELT, "algorithm=clipped_pg")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "clipped_pg names 'clip_hi', which no config key or run value supplies" in line and "clip_high" in line
    assert not (out / "final").exists() and "parameters in memory" not in proc.stdout + proc.stderr
