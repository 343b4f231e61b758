"""The `rlhf` command: help, --cfg, sweeps, a user's YAML file, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, assert_one_line_error, run_cli
from helpers import QUICK_SFT as TINY



def test_help_lists_only_existing_stages(tmp_path):
    """The stage list names exactly the stages with a runner module, the tool list exactly the tools."""
    from rlhf_cli.config import STAGE_SCHEMAS

    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    lists, current = {}, None
    for line in proc.stdout.splitlines():  # help is on stdout
        if line in ("stages:", "tools:"):
            current = lists.setdefault(line[:-1], [])
        elif line.startswith("  ") and current is not None:
            current.append(line.split()[0])
    runners = sorted(p.stem.replace("_", "-") for p in (REPO / "rlhf_cli" / "stages").glob("*.py")
                     if p.stem != "__init__")
    assert sorted(lists) == ["stages", "tools"]
    assert sorted(lists["stages"]) == runners == sorted(STAGE_SCHEMAS)
    assert lists["tools"] == ["validate", "eval", "plot", "generate", "label"]


def test_stage_help_lists_groups_and_documented_keys(tmp_path):
    proc = run_cli("sft", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    out = proc.stdout
    for key in ("output_dir", "seed", "max_steps", "model.path", "data.train", "data.eval", "optim.lr", "batch_size",
                "device.type"):
        assert key in out, key
    assert "model: " in out and "device: [auto], cpu, cuda" in out
    assert "peak learning rate" in out  # field docs are shown


def test_cfg_job_prints_the_composed_config(tmp_path):
    proc = run_cli("rl", "algorithm=ppo", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: ppo" in proc.stdout and "advantage: gae" in proc.stdout
    assert not (tmp_path / "runs").exists()  # printing the config writes nothing


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_user_yaml_file_plus_overrides(tmp_path):
    cfg = tmp_path / "my_sft.yaml"
    cfg.write_text("max_steps: 2\noptim:\n  lr: 0.001\ndata:\n  num_train: 32\n  num_eval: 8\nbatch_size: 8\n"
                   "eval:\n  every: 1000\n  max_new_tokens: 4\noutput_dir: from_yaml\n")
    proc = run_cli("sft", str(cfg), "optim.lr=0.002", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / "from_yaml" / "config.json").read_text())
    assert saved["max_steps"] == 2 and saved["optim"]["lr"] == 0.002  # the command line wins over the file
    assert (tmp_path / "from_yaml" / "final" / "config.json").exists()


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_sweep_goes_on_past_a_failed_job_and_names_dirs_that_pass_back_as_paths(tmp_path):
    """Two swept keys, one job's data missing: that job is reported with its overrides, the others run,
    a summary table closes the sweep, the exit status is non-zero; the job dirs (`key-value+key-value`,
    no `=` or `,`) pass back as model paths."""
    (tmp_path / "rows.jsonl").write_text("".join(f'{{"prompt": "{i} + 1 =", "completion": " {i + 1}"}}\n'
                                                 for i in range(16)))
    proc = run_cli("sft", "-m", "seed=1,2", "data.train=missing.jsonl,rows.jsonl", "max_steps=1", "output_dir=sweep",
                   *TINY, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # every failure was a user error: exit 2
    out = proc.stderr
    assert "sweep job 0 (seed=1 data.train=missing.jsonl) failed: data.train: file not found" in out
    summary = out[out.index("rlhf sft sweep: 4 jobs"):].splitlines()
    rows = [line.split("\t") for line in summary[2:6]]
    assert [(r[0], r[1], r[2]) for r in rows] == [("0", "seed=1 data.train=missing.jsonl", "failed"),
                                                  ("1", "seed=1 data.train=rows.jsonl", "ok"),
                                                  ("2", "seed=2 data.train=missing.jsonl", "failed"),
                                                  ("3", "seed=2 data.train=rows.jsonl", "ok")]
    assert "eval_loss=" in rows[1][3]  # final metrics of the jobs that ran
    assert "error: 2 of 4 sweep jobs failed" in out and "Traceback" not in out
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if (p / "final").exists())
    assert jobs == ["data.train-rows.jsonl+seed-1", "data.train-rows.jsonl+seed-2"]
    seeds = {json.loads((tmp_path / "sweep" / j / "config.json").read_text())["seed"] for j in jobs}
    assert seeds == {1, 2}
    back = run_cli("validate", "train-rm", f"model.path=sweep/{jobs[0]}/final", cwd=tmp_path)  # the name passes back
    assert back.returncode == 0, back.stdout + back.stderr


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_a_sweep_inside_a_run_dir_and_a_run_inside_a_sweep_dir_are_refused(tmp_path):
    """`rlhf rl` then `rlhf rl -m ...` (the README's old order) would put every job inside runs/rl; a single
    run into a sweep's dir would sit beside its jobs. Either way `rlhf plot` of the dir would hide runs."""
    (tmp_path / "runs" / "rl").mkdir(parents=True)
    (tmp_path / "runs" / "rl" / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1.0}\n')
    assert_one_line_error(run_cli("rl", "-m", "seed=1,2", cwd=tmp_path), "output_dir=runs/rl-sweep")
    assert sorted(p.name for p in (tmp_path / "runs" / "rl").iterdir()) == ["metrics.jsonl"]
    (tmp_path / "algos" / "seed-1").mkdir(parents=True)
    (tmp_path / "algos" / "multirun.yaml").write_text("hydra: {}\n")
    assert_one_line_error(run_cli("sft", "output_dir=algos", cwd=tmp_path), "holds a sweep")
    assert sorted(p.name for p in (tmp_path / "algos").iterdir()) == ["multirun.yaml", "seed-1"]


def test_step_logs_are_plain_lines_when_stdout_is_a_pipe(tmp_path):
    """Under nohup / SLURM (no terminal) every logged step is one whole line on stdout."""
    proc = run_cli("sft", "max_steps=3", "log_every=1", "output_dir=run", *TINY, cwd=tmp_path,
                   env={"RLHF_NO_PROGRESS": ""})  # the pipe alone, not the switch, turns the bar into lines
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("[sft] step ") and " train: " in line]
    assert [line.split()[2] for line in steps] == ["1/3", "2/3", "3/3"]
    assert all("loss=" in line and "lr=" in line and "tokens_per_s=" in line for line in steps)
    assert "[sft] step 3/3 eval: eval_loss=" in proc.stdout


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
