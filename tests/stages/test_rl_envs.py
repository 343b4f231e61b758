"""`rlhf rl env.name=...` (issue 30): RL over multi-turn episodes end to end, resume, eval and generate over
episodes, and environments that fail. The interface and the episodes themselves: tests/test_envs.py."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from helpers import assert_rl_resume_is_bit_identical
from helpers import read_metrics as metrics

ENV = "env.name=rlhf_cli.envs.modsteps:ModSteps"
TOKENS = ["rollout.max_new_tokens=12", "eval.max_new_tokens=12"]
QUICK = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.every=1000", "data.num_train=200"]


def files(sft_run) -> list[str]:
    data = sft_run.parent / "data"  # the modsteps_sft fixture writes the environment's files beside its run
    return [f"data.train={data / 'prompts_train.jsonl'}", f"data.eval={data / 'prompts_eval.jsonl'}"]


# a2c and ppo in make test-slow (a minute of CPU each); their per-turn credit is the packing checked by hand in
# tests/algorithms/test_turns.py, and the resume test below runs ppo's critic over episodes
@pytest.mark.parametrize("algorithm", [pytest.param("reinforce", marks=pytest.mark.slow), pytest.param("a2c", marks=pytest.mark.slow),
                                       pytest.param("ppo", marks=pytest.mark.slow)])
def test_rl_over_episodes_raises_held_out_success_by_30_points(modsteps_sft, tmp_path, algorithm):
    out = tmp_path / "rl"
    proc = run_cli("rl", f"algorithm={algorithm}", f"policy.path={modsteps_sft / 'final'}", ENV, "reward.functions=[]",
                   *files(modsteps_sft), *TOKENS, "max_steps=50", "eval.every=1000", f"output_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    before, after = manifest["metrics_before"]["eval_accuracy"], manifest["metrics"]["eval_accuracy"]
    assert after >= before + 0.30, (before, after)
    train = [r for r in metrics(out) if r["kind"] == "train"]
    # episodes play their 3 operations (one may hit the 12-token limit and end early), the environment never fails
    assert all(r["turns"] > 2.9 and r["env_errors"] == 0 for r in train)
    assert sum(r["env_return"] for r in train[-10:]) > sum(r["env_return"] for r in train[:10])
    assert "environment rlhf_cli.envs.modsteps:ModSteps" in proc.stdout + proc.stderr


def test_episodes_resume_bit_identical(modsteps_sft, tmp_path):
    # three steps straight against one, then a resume for two more: later turns' noise, the critic over episodes
    common = ["algorithm=ppo", f"policy.path={modsteps_sft / 'final'}", ENV, "reward.functions=[]",
              "checkpoint.every=1", *files(modsteps_sft), *TOKENS, *QUICK]
    assert_rl_resume_is_bit_identical(tmp_path, common)
    returns = [[r["env_return"] for r in metrics(tmp_path / run) if r["kind"] == "train"] for run in "ab"]
    assert returns[0][-2:] == returns[1][-2:]  # the resumed run sampled the uninterrupted one's episodes
    # `rlhf eval` of the run's final/ plays episodes against the run's own environment, unasked
    proc = run_cli("eval", str(tmp_path / "a" / "final"), "data.eval_limit=8", "--json", "eval.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["env"] == ENV.partition("=")[2] and result["metrics"]["prompts"] == 8


@pytest.mark.slow  # the default run's time on a 2-core machine (make test-slow runs it; session 18's note)
def test_episodes_survive_kill_9_inside_a_step(modsteps_sft, tmp_path):
    """SIGKILL inside a step of an RL run over episodes (the test-only injector of test_faults.py), then the
    same command again: the run resumes from its last checkpoint and ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys

    from test_faults import INJECTOR

    (tmp_path / "injector").mkdir()
    (tmp_path / "injector" / "sitecustomize.py").write_text(INJECTOR)
    common = ["algorithm=ppo", f"policy.path={modsteps_sft / 'final'}", ENV, "reward.functions=[]",
              "checkpoint.every=1", "max_steps=4", *files(modsteps_sft), *TOKENS, *QUICK]
    straight = run_cli("rl", f"output_dir={tmp_path / 'a'}", *common, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "FAULT_KILL": "step:6",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "injector"), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "rlhf_cli", "rl", f"output_dir={tmp_path / 'b'}", *common],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert list((tmp_path / "b" / "checkpoints").glob("step-*")), "killed before its first checkpoint"
    resumed = run_cli("rl", f"output_dir={tmp_path / 'b'}", *common, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at step" in resumed.stdout + resumed.stderr
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_eval_and_generate_run_episodes(modsteps_sft, tmp_path):
    final, data = modsteps_sft / "final", modsteps_sft.parent / "data"
    proc = run_cli("eval", str(final), ENV, f"data.eval={data / 'prompts_eval.jsonl'}", "data.eval_limit=20",
                   "eval.max_new_tokens=12", "eval.samples=4", "eval.pass_k=[1,4]", "--json", "eval.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    metrics = result["metrics"]
    assert result["env"] == "rlhf_cli.envs.modsteps:ModSteps" and metrics["prompts"] == 20
    assert 0 < metrics["accuracy"] < 1 and metrics["turns"] == 3
    # 4 sampled episodes a row: pass@1 their mean, pass@4 at least it
    samples = [g["samples_correct"] for g in result["generations"]]
    assert metrics["pass@1"] == pytest.approx(sum(samples) / 80) and metrics["pass@4"] >= metrics["pass@1"]
    for g in result["generations"]:
        episode = g["episode"]
        assert [m["role"] for m in episode["messages"]] == ["assistant", "user", "assistant", "user", "assistant"]
        assert len(episode["turn_rewards"]) == 3 and g["correct"] == episode["solved"]
        assert g["response"] == episode["messages"][-1]["content"]
    assert sum(g["correct"] for g in result["generations"]) / 20 == pytest.approx(result["metrics"]["accuracy"])  # float32

    proc = run_cli("generate", f"model.path={final}", ENV, f"data.prompts={data / 'prompts_train.jsonl'}",
                   "data.limit=3", "samples_per_prompt=2", "max_new_tokens=12", "output=gens.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "gens.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 == len(r["episodes"]) for r in rows)
    assert all(e["turns"] == 3 and e["end"] == "done" for r in rows for e in r["episodes"])
    assert rows[0]["prompt"].startswith("<|user|>Start at")  # the environment's opening, rendered


BAD_ENVS = '''
import time
from rlhf_cli.envs.modsteps import ModSteps

class Raising(ModSteps):
    def step(self, text):
        raise RuntimeError("tool down")

class Hanging(ModSteps):
    def step(self, text):
        time.sleep(60)

class WrongTypes(ModSteps):
    def step(self, text):
        return "fine"

class BadReset(ModSteps):
    def reset(self, row):
        return "Start at 3."

nothing = 3
'''


@pytest.mark.parametrize("env, reason", [("Raising", "step raised RuntimeError"), ("Hanging", "ran past"),
                                         ("WrongTypes", "step returned 'fine'")])
def test_an_environment_that_fails_ends_its_episodes_and_the_run_goes_on(modsteps_sft, tmp_path, env, reason):
    (tmp_path / "myenvs.py").write_text(BAD_ENVS)
    # no dynamic sampling: every group ties at 0 and would be drawn 4 times, each hung step waiting its timeout
    proc = run_cli("rl", f"policy.path={modsteps_sft / 'final'}", f"env.name=myenvs:{env}", "env.timeout_s=0.3",
                   "algorithm.dynamic_sampling=false",
                   "reward.functions=[]", *files(modsteps_sft), *TOKENS, *QUICK, "max_steps=1",
                   f"output_dir={tmp_path / 'rl'}", "eval.every=1000", "data.num_eval=4", "data.eval_limit=4",
                   cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [r for r in metrics(tmp_path / "rl") if r["kind"] == "train"]
    assert train[0]["env_errors"] == 1.0 and train[0]["turns"] == 1  # every episode ended at its first step
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("name, fragment", [
    ("myenvs:BadReset", "data.train row 0: reset returned 'Start at 3.': expected a list of {role, content}"),
    ("myenvs:nothing", "env.name=myenvs:nothing is not an environment class"),
    ("myenvs:Missing", "is not an environment class"),
    ("nosuchmod_q:Env", "cannot import module 'nosuchmod_q'"),
    ("myenvs.Raising", "is not 'module:Class'"),
])
def test_a_bad_environment_name_or_reset_is_one_error_line_before_any_weights_load(tmp_path, tiny_model_dir, name,
                                                                                   fragment):
    import shutil

    (tmp_path / "myenvs.py").write_text(BAD_ENVS)
    from rlhf_cli.envs import modsteps
    from rlhf_cli.envs.base import write

    write(modsteps.TASK, tmp_path / "data")
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").write_bytes(b"not weights")  # loading them would be another error
    proc = run_cli("rl", f"policy.path={model}", f"env.name={name}", "reward.functions=[]",
                   f"data.train={tmp_path / 'data/prompts_train.jsonl'}", "max_steps=1", f"output_dir={tmp_path / 'rl'}",
                   cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(proc, fragment)


def test_environments_are_refused_with_async_actors(tmp_path):
    proc = run_cli("rl", ENV, "rollout.mode=async", cwd=tmp_path)
    assert_one_line_error(proc, "rollout.mode=async does not support env.name")
