"""The README's first commands, in the README's order, on tiny settings: the documented sequence works and
each `rlhf plot` in it sees every run it names (the sweep's jobs included, none hidden inside another run).

    .venv/bin/pytest -q -m slow tests/cli/test_readme.py
"""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import REPO, run_cli
from helpers import ONE_THREAD, QUICK_RL, QUICK_SFT

TINY = {"sft": [*QUICK_SFT, "max_steps=2", *ONE_THREAD], "train-rm": [*QUICK_SFT, "max_steps=2", *ONE_THREAD],
        "dpo": [*QUICK_SFT, "max_steps=2", *ONE_THREAD],
        "rl": [*QUICK_RL, "max_steps=1", "rollout.max_new_tokens=4", "eval.max_new_tokens=4", *ONE_THREAD]}


def readme_commands() -> list[list[str]]:
    """The `rlhf ...` lines of the README's first sh block, comments dropped."""
    block = re.search(r"```sh\n(\. \.venv/bin/activate\n.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("rlhf ")]


@pytest.mark.slow  # sft, train-rm, rl and a nine-job rl sweep: about a minute of CPU
def test_the_readme_sequence_runs_and_its_plots_see_every_run(tmp_path):
    commands = readme_commands()
    assert [c[1] for c in commands][:3] == ["sft", "train-rm", "rl"] and "-m" in sum(commands, [])
    for command in commands:
        stage = command[1]
        proc = run_cli(*command[1:], *TINY.get(stage, []), cwd=tmp_path)
        assert proc.returncode == 0, f"{shlex.join(command)}\n{proc.stdout}{proc.stderr}"
        if stage == "plot":
            run_dirs = [a for a in command[2:] if not a.startswith("-") and not a.endswith(".png")]
            expected = []
            for d in run_dirs:
                root = tmp_path / d
                expected += [root] if (root / "metrics.jsonl").exists() else \
                    sorted(p for p in root.iterdir() if (p / "metrics.jsonl").exists())
            shown = int(re.search(r"(\d+) run\(s\)", proc.stderr).group(1))
            assert shown == len(expected) and len(expected) >= 3, proc.stderr
            if run_dirs == ["runs/algos"]:
                assert len(expected) == 9  # algorithm=reinforce,a2c,ppo x seed=1,2,3
            assert (tmp_path / command[command.index("-o") + 1]).stat().st_size > 10_000
