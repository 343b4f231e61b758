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
from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, Registry

SIGNATURES = {  # the positional arguments every entry takes, then **hparams (except KL: two tensors)
    "POLICY_LOSSES": (POLICY_LOSSES, ["logprobs", "logprobs_old", "advantages", "response_mask"], True),
    "ADVANTAGE_ESTIMATORS": (ADVANTAGE_ESTIMATORS, ["rewards", "values", "response_mask", "scores"], True),
    "KL_ESTIMATORS": (KL_ESTIMATORS, ["logprobs", "logprobs_ref"], False),
    "LOSS_AGGREGATIONS": (LOSS_AGGREGATIONS, ["loss_mat", "response_mask"], True),
}


@pytest.mark.parametrize("registry", sorted(SIGNATURES))
def test_every_entry_of_a_registry_takes_the_same_arguments(registry):
    entries, leading, takes_hparams = SIGNATURES[registry]
    for name, fn in entries.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:len(leading)]] == leading, name
        assert all(p.kind in (p.POSITIONAL_OR_KEYWORD,) for p in params[:len(leading)]), name
        has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        assert has_var_kw == takes_hparams, f"{name}: **hparams"
        # anything after the shared arguments has a default or is a keyword the recipe passes
        extra = [p.name for p in params[len(leading):] if p.kind is not p.VAR_KEYWORD and p.default is p.empty]
        assert set(extra) <= {"gamma", "lam", "nstep", "baseline", "group_size"}, (name, extra)


def test_every_loss_and_estimator_runs_through_the_same_call():
    """The recipe's two calls, verbatim, on a small batch: every entry answers them."""
    torch.manual_seed(0)
    B, T = 4, 5
    mask = torch.ones(B, T)
    hparams = {"name": "x", "advantage": "x", "baseline": "rloo", "gamma": 1.0, "lam": 0.95, "nstep": 2,
               "clip_low": 0.2, "clip_high": 0.2, "value_clip": 0.2, "epochs": 1, "minibatches": 1}
    from rlhf_cli.algorithms import RunningMean

    for name, estimate in ADVANTAGE_ESTIMATORS.items():
        advantages, returns = estimate(torch.randn(B, T), torch.randn(B, T), mask, torch.randn(B), group_size=2,
                                       running_mean=RunningMean(), **hparams)
        assert advantages.shape == returns.shape == (B, T), name
    for name, loss_fn in POLICY_LOSSES.items():
        logprobs = torch.randn(B, T, requires_grad=True)
        loss, stats = loss_fn(logprobs, logprobs.detach() + 0.1, torch.randn(B, T), mask, **hparams)
        loss.backward()
        assert loss.dim() == 0 and isinstance(stats, dict) and logprobs.grad is not None, name


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
"""A new advantage estimator and a new policy loss, registered as a contributor would write them in
rlhf_cli/algorithms/ (here loaded at start-up by sitecustomize, so the package itself stays unedited)."""
import torch
from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, discounted_returns, masked_mean


@ADVANTAGE_ESTIMATORS.register("batch_mean")
def batch_mean(rewards, values, response_mask, scores=None, *, gamma, **hparams):
    returns = discounted_returns(rewards, response_mask, gamma)
    return (returns - returns[:, 0].mean()) * response_mask, returns


@POLICY_LOSSES.register("scaled_pg")
def scaled_pg(logprobs, logprobs_old, advantages, response_mask, scale=0.5, **hparams):
    loss = -scale * masked_mean(advantages.detach() * logprobs, response_mask)
    return loss, {"adv_abs_mean": masked_mean(advantages.abs(), response_mask).detach()}
'''

YAML = """# A policy-gradient loss at half strength with a batch-mean baseline.
#   rlhf rl algorithm=scaled_pg
name: scaled_pg
advantage: batch_mean
epochs: 1
minibatches: 1
"""


def test_adding_an_estimator_and_a_loss_is_one_decorated_function_each_plus_a_yaml(tmp_path, tiny_model_dir):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(PLUGIN)
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "algorithm" / "scaled_pg.yaml").write_text(YAML)
    out = tmp_path / "run"
    proc = run_cli("rl", "algorithm=scaled_pg", f"policy.path={tiny_model_dir}", f"output_dir={out}", "max_steps=2",
                   "reward.functions=[rlhf_cli.task:correctness_reward]", "rollout.prompts_per_step=2",
                   "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "data.num_train=8", "data.num_eval=2",
                   "eval.max_new_tokens=4", "device=cpu", "device.threads=1", cwd=tmp_path,
                   env={"PYTHONPATH": str(plugin), "RLHF_CONF_DIR": str(conf)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rl: scaled_pg (batch_mean)" in proc.stdout + proc.stderr
    train = read_metrics(out, "train")
    assert [r["step"] for r in train] == [1, 2] and all("adv_abs_mean" in r for r in train)  # the loss's own stat
    assert json.loads((out / "config.json").read_text())["algorithm"]["advantage"] == "batch_mean"
    assert "final" in {p.name for p in out.iterdir()} and load_weights(out).keys() == load_weights(tiny_model_dir).keys()
