"""Help that tells the truth: defaults from the composed config, on stdout, whole lines in a pipe;
`rlhf --version`; bash tab completion through a real bash; the same key names in every command.

Every command runs as a subprocess whose stdout is a pipe, as `rlhf rl --help | grep kl` runs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_one_line_error, run_cli
from rlhf_cli.training.checkpoint import flatten

HELP_LINE = re.compile(r"^  (\S+) += (.*?)(?:  # .*)?$")


def help_defaults(stdout: str) -> dict:
    """The `key = value  # doc` lines of a stage's help (plain, as in a pipe) -> key: parsed value."""
    found = {}
    for line in stdout.splitlines():
        m = HELP_LINE.match(line)
        if m:
            found[m.group(1)] = yaml.safe_load(m.group(2))
    return found


@pytest.mark.parametrize("stage,choice", [
    ("sft", []), ("rl", ["algorithm=reinforce"]), ("rl", ["algorithm=ppo", "reward=rule_rm"]),
    pytest.param("train-rm", [], marks=pytest.mark.slow),  # ~6 s of CPU each (two processes that import torch)
    pytest.param("rl", ["algorithm=a2c"], marks=pytest.mark.slow)])
def test_help_shows_the_composed_defaults_of_cfg_job(tmp_path, stage, choice):
    """Every key's default in `--help` equals Hydra's composed config (`--cfg job`) for the same
    stage and group options: a schema default a stage's YAML or an algorithm's YAML overrides
    (ppo's minibatches 2) shows as what the run will use; keys resolved by the model's origin (optim.lr) show
    null in both (tests/test_origin.py checks what they resolve to)."""
    from rlhf_cli.config import STAGE_SCHEMAS, leaf_keys

    shown = run_cli(stage, *choice, "--help", cwd=tmp_path)
    job = run_cli(stage, *choice, "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0 and job.returncode == 0, shown.stderr + job.stderr
    composed = flatten(yaml.safe_load(job.stdout))
    defaults = help_defaults(shown.stdout)  # on stdout, one whole line per key
    assert sorted(defaults) == sorted(leaf_keys(STAGE_SCHEMAS[stage])) == sorted(composed)
    assert defaults == composed
    if stage == "rl":
        assert defaults["optim.lr"] is None and defaults["algorithm.name"] == choice[0].split("=")[1]
        assert defaults["algorithm.minibatches"] == (2 if "algorithm=ppo" in choice else 1)
        assert defaults["algorithm.epochs"] == (None if "algorithm=ppo" in choice else 1)  # ppo: null, by staleness
        # the longest key, whole (a pipe once cut it to `rollout.samples_per_pr…`)
        assert re.search(r"^  rollout\.samples_per_prompt += 8  # K responses per prompt", shown.stdout, re.M)
        assert max(len(line) for line in shown.stdout.splitlines()) > 120  # nothing wrapped at 80 columns
    assert "[" + (choice[0].split("=")[1] if choice else "auto") + "]" in shown.stdout  # the chosen option marked
    assert not (tmp_path / "runs").exists()


def test_version_matches_the_package(tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"rlhf {version}"


def test_top_level_and_tool_help_go_to_stdout(tmp_path):
    top = run_cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and re.search(r"^  train-rm +reward model from", top.stdout, re.M)
    for tool in ("validate", "eval", "plot", "generate", "label"):
        proc = run_cli(tool, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and f"rlhf {tool}" in proc.stdout and not proc.stderr.strip(), proc.stderr


def test_eval_names_keys_as_the_stages_do(tmp_path):
    """device.type / device.threads / model.dtype / reward.model.path: the stages' names; the old names
    are refused with the new one."""
    from rlhf_cli.config.tools import EvalToolConfig
    from rlhf_cli.config import RLConfig, SFTConfig, leaf_keys

    eval_keys = set(leaf_keys(EvalToolConfig))
    stage_keys = set(leaf_keys(SFTConfig)) | set(leaf_keys(RLConfig))
    assert {"device.type", "device.threads", "model.dtype", "model.trust_remote_code", "reward.model.path"} <= eval_keys
    assert eval_keys <= stage_keys  # no key of its own: every eval key means what it means in a stage
    defaults = help_defaults(run_cli("eval", "--help", cwd=tmp_path).stdout)
    assert defaults["device.type"] == "auto" and defaults["device.threads"] is None
    assert_one_line_error(run_cli("eval", "x", "reward_model=y", cwd=tmp_path), "reward.model.path")


def bash_complete(line: str, tmp_path: Path) -> list[str]:
    """What bash offers for `line` (cursor at its end): the script `rlhf completion bash` prints, sourced
    into a real bash, its completion function called as bash calls it."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = ('eval "$(rlhf completion bash)"\n'
              'COMP_LINE="$1"; COMP_POINT=${#COMP_LINE}\n'
              'read -ra COMP_WORDS <<< "$COMP_LINE"; COMP_CWORD=${#COMP_WORDS[@]}\n'
              'complete -p rlhf >/dev/null || exit 3\n'
              '_rlhf_complete rlhf "" ""\n'
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    proc = subprocess.run(["bash", "-c", script, "bash", line], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_completion_of_stages_groups_and_keys(tmp_path):
    assert bash_complete("rlhf ", tmp_path)[:4] == ["sft", "train-rm", "dpo", "rl"]
    assert bash_complete("rlhf tr", tmp_path) == ["train-rm"]
    assert set(bash_complete("rlhf rl algorithm=", tmp_path)) == {"a2c", "ppo", "reinforce"}  # after bash's `=` break
    assert bash_complete("rlhf rl optim.l", tmp_path) == ["optim.lr="]
    assert "rollout." in bash_complete("rlhf rl ", tmp_path)


def test_hydra_shell_completion_points_to_ours(tmp_path):
    assert_one_line_error(run_cli("rl", "-sc", "install=bash", cwd=tmp_path), "rlhf completion bash")
