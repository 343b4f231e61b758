"""The `rlhf` command: help, --cfg, sweeps, a user's YAML file, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from helpers import QUICK_SFT as TINY



def test_help_lists_only_existing_stages(tmp_path):
    """The stage table names exactly the stages with a runner module, the tool table exactly the tools."""
    from rlhf_cli.config import STAGE_SCHEMAS

    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    tables, current = [], None
    for line in proc.stderr.splitlines():
        if line.startswith("┃"):
            current = []
            tables.append(current)
        elif line.startswith("│") and current is not None and line.split("│")[1].strip():
            current.append(line.split("│")[1].strip())
    runners = sorted(p.stem.replace("_", "-") for p in (REPO / "rlhf_cli" / "stages").glob("*.py")
                     if p.stem != "__init__")
    assert len(tables) == 2
    assert sorted(tables[0]) == runners == sorted(STAGE_SCHEMAS)
    assert tables[1] == ["validate", "eval", "plot"]


def test_stage_help_lists_groups_and_documented_keys(tmp_path):
    proc = run_cli("sft", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    out = proc.stderr
    for key in ("output_dir", "seed", "max_steps", "model.path", "data.train", "data.eval", "optim.lr", "batch_size",
                "device.type"):
        assert key in out, key
    assert "model: " in out and "device: auto, cpu, cuda" in out
    assert "peak learning rate" in out  # field docs are shown


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli("rl", "algorithm=ppo", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: ppo" in proc.stdout and "advantage: gae" in proc.stdout
    assert not (tmp_path / "runs").exists()  # printing the config writes nothing


def test_user_yaml_file_plus_overrides(tmp_path):
    cfg = tmp_path / "my_sft.yaml"
    cfg.write_text("max_steps: 2\noptim:\n  lr: 0.001\ndata:\n  num_train: 32\n  num_eval: 8\nbatch_size: 8\n"
                   "eval:\n  every: 1000\n  max_new_tokens: 4\noutput_dir: from_yaml\n")
    proc = run_cli("sft", str(cfg), "optim.lr=0.002", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "from_yaml" / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["optim"]["lr"] == 0.002  # the command line wins over the file
    assert (tmp_path / "from_yaml" / "final" / "config.json").exists()


def test_multirun_sweep_gives_each_job_its_own_dir(tmp_path):
    proc = run_cli("sft", "-m", "seed=1,2", "max_steps=1", "output_dir=sweep", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "final").exists())
    assert jobs == ["seed=1", "seed=2"]
    seeds = {json.loads((tmp_path / "sweep" / j / "config.json").read_text())["seed"] for j in jobs}
    assert seeds == {1, 2}


# bad config values, data files and model paths: the one table in tests/test_bad_inputs.py


def test_unknown_stage_suggests_the_closest(tmp_path):
    assert_one_line_error(run_cli("stf", cwd=tmp_path), "did you mean 'sft'")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(run_cli("sft", f"output_dir={locked / 'run'}", cwd=tmp_path), "not writable")


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run_cli("sft", "output_dir=afile/run", "max_steps=1", *TINY, cwd=tmp_path), "not writable")
