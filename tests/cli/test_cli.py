"""The `rlhf` command: help, --cfg, sweeps, a user's YAML file, and one-line errors for bad input."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_one_line_error, run_cli

TINY = ["data.num_train=32", "data.num_eval=8", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=4"]


def test_help_lists_only_existing_stages(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for stage in ("sft", "train-rm", "rl"):
        assert stage in proc.stderr


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


# input -> message fragment; each must exit 2 with one line, no traceback, before any model loads
CONFIG_ERRORS = [
    (["optim.lrr=1"], "did you mean optim.lr"),
    (["batch_sise=4"], "did you mean batch_size"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["max_steps=0"], "max_steps must be > 0"),
    (["model.dtype=fp8"], "model.dtype"),
    (["device=tpu"], "device"),
    (["device.type=cuda:7"], "cuda"),
    (["optim.betas=[0.9]"], "optim.betas"),
]


@pytest.mark.parametrize("overrides,fragment", CONFIG_ERRORS)
def test_config_errors_are_one_line_and_write_nothing(tmp_path, overrides, fragment):
    proc = run_cli("sft", "output_dir=out", *overrides, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    if "cuda" not in fragment:  # the device is checked at setup, still before any model or data loads
        assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out" / "final").exists() and not (tmp_path / "out" / "base").exists()


def test_unknown_stage_suggests_the_closest(tmp_path):
    assert_one_line_error(run_cli("stf", cwd=tmp_path), "did you mean 'sft'")


def _write(path, text):
    path.write_text(text)
    return path


DATA_ERRORS = {
    "missing file": (lambda d: ["data.train=" + str(d / "nope.jsonl")], "file not found"),
    "malformed line": (lambda d: ["data.train=" + str(_write(d / "bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n'))],
                       "line 2 is not valid JSON"),
    "wrong fields": (lambda d: ["data.train=" + str(_write(d / "f.jsonl", '{"question": "a", "answer": "b"}\n'))],
                     "needs prompt/completion or messages"),
    "empty file": (lambda d: ["data.train=" + str(_write(d / "e.jsonl", "\n"))], "has no rows"),
    "unsupported type": (lambda d: ["data.train=" + str(_write(d / "x.txt", "hi"))], "unsupported file type .txt"),
    "model path missing": (lambda d: ["model.path=" + str(d / "no_model")], "does not exist"),
    "model path not a model": (lambda d: ["model.path=" + str(d)], "not a Hugging Face model directory"),
}


@pytest.mark.parametrize("case", sorted(DATA_ERRORS))
def test_bad_data_and_model_paths(tmp_path, case):
    make, fragment = DATA_ERRORS[case]
    args = make(tmp_path)
    proc = run_cli("sft", "output_dir=out", "max_steps=1", *TINY, *args, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out" / "final").exists() and not list((tmp_path / "out" / "checkpoints").glob("step-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(run_cli("sft", f"output_dir={locked / 'run'}", cwd=tmp_path), "not writable")


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run_cli("sft", "output_dir=afile/run", "max_steps=1", *TINY, cwd=tmp_path), "not writable")
