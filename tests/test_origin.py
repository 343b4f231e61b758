"""Defaults by what a stage starts from (rlhf_cli/config/origin.py): a model built from a config (the embedded default, the
task suite) keeps the from-scratch rates; a pretrained one (weights loaded) takes rates its weights survive."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf_cli.commands.compose import compose_config
from rlhf_cli.config import origin


@pytest.fixture()
def pretrained_layout(tiny_model_dir, tmp_path):
    """The tiny model's directory without the built-from-config mark: what any user's checkpoint looks like."""
    out = tmp_path / "pretrained"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.pop(origin.MARK)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_embedded_model_and_its_lineage_carry_the_mark(tiny_model_dir, sft_run):
    assert origin.weights_origin(None) == origin.SCRATCH
    assert origin.weights_origin(str(tiny_model_dir)) == origin.SCRATCH
    assert origin.weights_origin(str(sft_run / "final")) == origin.SCRATCH  # save_pretrained keeps the mark


@pytest.mark.parametrize("stage, key, scratch, pretrained", [
    ("sft", "optim.lr", 6e-3, 2e-5), ("train-rm", "optim.lr", 1e-3, 1e-5), ("rl", "optim.lr", 3e-4, 1e-5),
])
def test_learning_rates_follow_the_origin_unless_set(tiny_model_dir, pretrained_layout, stage, key, scratch,
                                                     pretrained):
    path_key = "policy.path" if stage == "rl" else "model.path"
    get = lambda cfg: cfg.optim.lr  # noqa: E731
    assert get(compose_config(stage, [])) == scratch  # the embedded default
    assert get(compose_config(stage, [f"{path_key}={tiny_model_dir}"])) == scratch
    cfg = compose_config(stage, [f"{path_key}={pretrained_layout}"])
    assert get(cfg) == pretrained and f"{key}={pretrained:g}" in cfg.derived
    assert get(compose_config(stage, [f"{path_key}={pretrained_layout}", "optim.lr=1e-4"])) == 1e-4  # set: kept
    # the value in force is what config.yaml keeps, so a rerun compares like with like
    assert not any(d.startswith("optim.lr") for d in compose_config(stage, [f"{path_key}={pretrained_layout}",
                                                                            "optim.lr=1e-4"]).derived)


@pytest.mark.parametrize("stage, steps", [("sft", 1500), ("train-rm", 2000)])
def test_run_length_follows_the_origin_unless_steps_or_epochs_are_set(tiny_model_dir, pretrained_layout, stage,
                                                                      steps):
    scratch = compose_config(stage, [f"model.path={tiny_model_dir}"])
    assert (scratch.max_steps, scratch.epochs) == (steps, 1.0)
    pretrained = compose_config(stage, [f"model.path={pretrained_layout}"])
    assert (pretrained.max_steps, pretrained.epochs) == (None, 1.0)  # one pass over the data
    assert compose_config(stage, [f"model.path={pretrained_layout}", "max_steps=7"]).max_steps == 7
    chosen = compose_config(stage, [f"model.path={tiny_model_dir}", "epochs=2"])
    assert (chosen.max_steps, chosen.epochs) == (None, 2)  # epochs set: the from-scratch step count is not forced


def test_a_pretrained_run_says_which_defaults_it_took(pretrained_layout):
    cfg = compose_config("rl", [f"policy.path={pretrained_layout}"])
    line = origin.describe("rl", cfg, str(pretrained_layout))
    took = "optim.lr=1e-05" + (", device.autocast=bf16" if cfg.device.autocast == "bf16" else "")
    assert line.startswith(f"rl: {took}: the defaults for a pretrained model")
    assert origin.describe("rl", compose_config("rl", ["optim.lr=1e-5"]), None) is None


def test_rl_autocasts_a_pretrained_model_to_bf16_where_the_cpu_has_bf16_units(tiny_model_dir, pretrained_layout,
                                                                             tmp_path):
    """device.autocast unset: bf16 for rl on a pretrained model where the device multiplies in bf16 (this CPU's
    flags decide); none from scratch, for sft and train-rm, and wherever it is set."""
    fast = "bf16" if origin.cpu_has_bf16() else "none"
    assert compose_config("rl", [f"policy.path={pretrained_layout}", "device=cpu"]).device.autocast == fast
    assert compose_config("rl", [f"policy.path={tiny_model_dir}", "device=cpu"]).device.autocast == "none"
    assert compose_config("rl", ["device=cpu"]).device.autocast == "none"  # the embedded model
    assert compose_config("rl", [f"policy.path={pretrained_layout}", "device=cpu",
                                 "device.autocast=none"]).device.autocast == "none"
    for stage in ("sft", "train-rm"):
        assert compose_config(stage, [f"model.path={pretrained_layout}", "device=cpu"]).device.autocast == "none"
    for flags, has in (("fpu sse2 avx512f avx512_bf16 amx_tile", True), ("fpu amx_bf16", True),
                       ("fpu sse2 avx2 avx512f", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert origin.cpu_has_bf16(str(tmp_path / "cpuinfo")) is has
    assert origin.cpu_has_bf16(str(tmp_path / "missing")) is False


def test_every_default_a_run_derives_is_recorded_as_derived_and_no_key_set():
    """`derived` holds every key the config left null and the run resolved (by origin, by reward source, by rollout
    mode), so the manifest tells them from keys set; the origin line names only the by-origin ones."""
    cfg = compose_config("rl", [])
    assert {"kl.coef=0.05", "algorithm.dynamic_sampling=True"} <= set(cfg.derived)
    assert "kl.coef=0.2" in compose_config("rl", ["reward=rm", "reward.model.path=x"]).derived
    assert "algorithm.epochs=2" in compose_config("rl", ["algorithm=ppo"]).derived  # ppo.yaml leaves it null
    chosen = compose_config("rl", ["algorithm=ppo", "kl.coef=0.05", "algorithm.dynamic_sampling=true",
                                   "algorithm.epochs=2"]).derived
    assert not any(d.startswith(("kl.coef", "algorithm.")) for d in chosen)  # the same values, set: not derived
    assert origin.describe("rl", cfg, None).startswith("rl: optim.lr=0.0003")
    assert "kl.coef" not in origin.describe("rl", cfg, None)
