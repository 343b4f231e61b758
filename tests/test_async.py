"""rollout.mode=async (rlhf_cli/rl/actors.py): 1 actor + 1 learner as 2 torchrun processes, gloo, 1 thread each.

    .venv/bin/pytest -q -m slow tests/test_async.py

Each case is a real `torchrun --standalone` (and, for the comparison, a real single-process `python -m
rlhf_cli`) on the embedded tiny model. A torchrun of two ranks costs ~10 s of CPU, so every case is `slow`;
the layouts refused before anything starts are rows of tests/test_bad_inputs.py (cheap, default run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from helpers import DIST_RL as RL_COMMON
from helpers import load_weights, read_metrics
from test_distributed import SPREAD_REWARD, max_diff, text, torchrun

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ASYNC = ["rollout.mode=async", "rollout.actors=1"]


@pytest.fixture
def root(tmp_path) -> tuple[Path, dict]:
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    return tmp_path, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "train")]


@pytest.mark.parametrize("algorithm", ["reinforce", "a2c", "ppo"])
def test_max_lag_0_gives_the_synchronous_updates(root, algorithm):
    """max_lag=0: the actor generates step s with the learner's weights after s updates, so the batch, its
    rewards and reference log-probs are the sync run's, the importance weights are 1 and V-trace is GAE."""
    root, env = root
    args = [*RL_COMMON, f"algorithm={algorithm}", "max_steps=3"]
    sync = run_cli("rl", f"output_dir={root / 'sync'}", *args, cwd=root, env=env)
    assert sync.returncode == 0, sync.stderr[-3000:]
    lag0 = torchrun(2, "rl", f"output_dir={root / 'async'}", *args, *ASYNC, "rollout.max_lag=0", cwd=root, env=env)
    assert lag0.returncode == 0, lag0.stderr[-3000:]
    assert "1 learner rank(s) (0..0) + 1 actor rank(s)" in text(lag0)
    base = load_weights(root / "sync" / "base")
    moved = max_diff(load_weights(root / "sync"), base)
    assert moved > 1e-4  # the updates moved the weights
    # PPO's several passes: the sync run's old log-probs are its sampler's (fp32), the learner's are its own
    # no-grad forward of the same weights; the two differ by rounding (~1e-5 a token), which shows in the weights
    # at ~4e-4 of the update after 3 steps (a wrong batch, reward or weight would differ by the update itself)
    assert max_diff(load_weights(root / "async"), load_weights(root / "sync")) < (
        1e-6 if algorithm != "ppo" else 1e-3 * moved)
    assert all(r["async_lag"] == 0 for r in read_metrics(root / "async", "train"))
    assert train_steps(root / "async") == [1, 2, 3]


def test_two_learners_on_a_sub_group_give_the_ddp_updates(root):
    """3 processes: learners 0 and 1 (DDP on their own group) + actor 2, max_lag=0, equal the sync run of 2 DDP
    ranks: the actor makes both learners' shares with the noise keys ranks 0 and 1 would use."""
    root, env = root
    args = [*RL_COMMON, "algorithm=ppo", "max_steps=2"]
    ddp = torchrun(2, "rl", f"output_dir={root / 'ddp'}", *args, cwd=root, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    split = torchrun(3, "rl", f"output_dir={root / 'split'}", *args, *ASYNC, "rollout.max_lag=0", cwd=root, env=env)
    assert split.returncode == 0, split.stderr[-3000:]
    assert "2 learner rank(s) (0..1) + 1 actor rank(s)" in text(split)
    moved = max_diff(load_weights(root / "ddp"), load_weights(root / "ddp" / "base"))
    assert moved > 1e-4
    # PPO: the DDP run's old log-probs are its sampler's, the learners' their own forward's: rounding apart
    # (test_max_lag_0_gives_the_synchronous_updates)
    assert max_diff(load_weights(root / "split"), load_weights(root / "ddp")) < 1e-3 * moved


def test_lag_runs_and_logs_lag_wait_and_utilisation(root):
    """max_lag=2 with weights every 2 updates (PPO, 2 minibatches x 1 epoch: the default under a lag, said in
    the log): lags stay within the bound and reach it; every step logs the lag, the learner's wait and the actor's times and busy fraction."""
    root, env = root
    run = root / "lag"
    proc = torchrun(2, "rl", f"output_dir={run}", *RL_COMMON, "algorithm=ppo", "max_steps=5", *ASYNC,
                    "rollout.max_lag=2", "rollout.sync_every=2", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(run, "train")
    assert "2 minibatch(es) x 1 epoch(s) per rollout" in text(proc) and "rl: algorithm.epochs 1 (derived: batches up to" in text(proc)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # rank 0 writes, once per step
    lags = [r["async_lag"] for r in rows]
    assert lags[0] == 0 and max(lags) == 2 and all(0 <= lag <= 2 for lag in lags), lags
    for r in rows:
        assert r["async_learner_wait_s"] >= 0 and r["async_actor_generate_s"] > 0 and r["async_actor_score_s"] > 0
        assert 0 < r["async_actor_busy_frac"] <= 1 and 0 <= r["time_rollout_frac"] <= 1
        assert abs(r["score"]) < 10 and r["kl"] == r["kl"]  # finite
        assert 0.5 < r["is_ratio"] < 2 and 0 <= r["is_truncated_frac"] <= 1  # pi_prox / mu of the sampled tokens
    assert rows[0]["is_ratio"] == 1 and rows[0]["is_truncated_frac"] == 0  # step 1: the actor had the same weights
    assert (run / "final" / "model.safetensors").exists()


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes torchrun started (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        rank = next((e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")), None)
        if parent == launcher_pid and rank is not None:
            found[int(rank)] = int(entry.name)
    return found


def launch(root: Path, env: dict, *args: str) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}, "RLHF_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                             "-m", "rlhf_cli", "rl", *args], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / f"step-{step:06d}" / "manifest.json").exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} was not checkpointed: {proc.poll()}")


@pytest.mark.parametrize("victim", ["learner", "actor"])
def test_kill_9_of_a_rank_then_rerun_finishes_counting_each_step_once(root, victim):
    """kill -9 of rank 0 (the learner) or rank 1 (the actor) after step 2's checkpoint: torchrun stops the
    other; the same command resumes from the newest checkpoint, the actor regenerates what was in flight,
    and the run ends at max_steps with one metrics row per step and final metrics in range."""
    root, env = root
    run = root / "killed"
    args = [f"output_dir={run}", *RL_COMMON, "algorithm=a2c", "max_steps=6", *ASYNC]
    first = launch(root, env, *args)
    wait_for_step(run, 2, first)
    pids = rank_pids(first.pid)
    os.kill(pids[0 if victim == "learner" else 1], signal.SIGKILL)
    first.communicate(timeout=120)
    assert first.returncode != 0
    steps_before = train_steps(run)
    assert 2 <= max(steps_before) < 6
    again = torchrun(2, "rl", *args, cwd=root, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in text(again)
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]  # nothing counted twice, nothing missing
    last = read_metrics(run, "train")[-1]
    assert 0 <= last["score"] <= 1 and abs(last["kl"]) < 1 and 0 <= last["async_lag"] <= 1


def test_sigterm_stops_at_a_step_boundary_and_resumes(root):
    """SIGTERM to torchrun (what SLURM sends): the learner finishes its step, checkpoints and exits 143; the
    rerun resumes there and finishes."""
    root, env = root
    run = root / "term"
    args = [f"output_dir={run}", *RL_COMMON, "max_steps=6", *ASYNC]
    first = launch(root, env, *args)
    wait_for_step(run, 1, first)
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert "stopped by SIGTERM after step" in " ".join(out.split()), out[-3000:]
    stopped_at = max(train_steps(run))
    assert (run / "checkpoints" / f"step-{stopped_at:06d}" / "manifest.json").exists()
    again = torchrun(2, "rl", *args, cwd=root, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]
