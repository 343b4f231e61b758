"""The step guard against finite blow-ups, resuming with safe-to-change keys, and run identity (issue 16).

    .venv/bin/pytest -q tests/test_guard_and_rerun.py

- An absurd optim.lr stops the run at the update that wrecks the weights, before a checkpoint of them;
  the error names the checkpoint to resume from, whose weights are sane; rerunning with only a lower
  optim.lr resumes from it, finishes, and records the change in changes.jsonl.
- StepGuard on its own (hand-made tensors): spikes, streaks, weight growth, the zero-gradient floor.
- keep_last never prunes the newest checkpoint the guard trusts; a stopped run's untrusted ones are set aside.
- A run is the same run whatever the spelling of its directory (absolute, relative, another cwd) and of
  its model path; a refused rerun leaves every file of the run byte-identical.
- The lr explosion in train-rm and rl (slow: `make test-slow`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from helpers import FAULTS_SFT as QUICK_SFT
from helpers import load_weights, read_metrics
from rlhf_cli.errors import UserError
from rlhf_cli.training.checkpoint import RunDir, rerun_changes
from rlhf_cli.training.optim import Blowup, StepGuard

CKPT_EVERY_STEP = ["checkpoint.every=1", "checkpoint.keep_last=1"]


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones and .hydra/ included), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def max_abs(weights: dict) -> float:
    return max(float(t.abs().max()) for t in weights.values())


# ---------------------------------------------------------------- an absurd learning rate, end to end


def test_lr_explosion_keeps_a_sane_checkpoint_and_resumes_with_a_lower_lr(tmp_path, tiny_model_dir):
    model = [f"model.path={tiny_model_dir}", *QUICK_SFT, *CKPT_EVERY_STEP]
    first = run_cli("sft", "output_dir=run", *model, "max_steps=3", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "run"
    sane = max_abs(load_weights(run / "checkpoints" / "step-000003" / "model.safetensors"))
    assert sane < 5

    # the same run taken further with an absurd peak lr: the first update at it wrecks the weights
    bad = run_cli("sft", "output_dir=run", *model, "max_steps=8", "optim.lr=1e4", cwd=tmp_path)
    assert_one_line_error(bad, "grew the weight norm")
    ckpt = run / "checkpoints" / "step-000003"
    assert f"at step 4; stopped: the last checkpoint before it is {ckpt}" in bad.stdout + bad.stderr
    assert "optim.lr=1000" in bad.stdout + bad.stderr  # the fix, a tenth of the lr that blew up
    assert json.loads((run / "final" / "manifest.json").read_text())["steps"] == 3  # the first run's, untouched
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert names[-1] == "step-000003", names  # nothing of the wrecked weights was checkpointed
    assert max_abs(load_weights(ckpt / "model.safetensors")) == sane

    # only optim.lr lowered: resumes from step 3 (not refused as another config) and finishes
    again = run_cli("sft", "output_dir=run", *model, "max_steps=8", "optim.lr=1e-3", cwd=tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "resuming at step 3" in out and "optim.lr 10000.0 -> 0.001" in out, out
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(1, 9))
    assert all(abs(r["lr"]) <= 1e-3 for r in read_metrics(run, "train") if r["step"] > 3)  # the new lr was used
    assert max_abs(load_weights(run)) < 2 * sane
    changes = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert changes[-1]["from_step"] == 4 and changes[-1]["resumed_from"] == "step-000003"
    assert changes[-1]["changes"] == {"optim.lr": [10000.0, 0.001]}
    assert changes[0]["changes"] == {"max_steps": [3, 8], "optim.lr": [6e-3, 10000.0]}  # the rerun that blew up


# ---------------------------------------------------------------- StepGuard, unit


def _step(guard: StepGuard, w: torch.nn.Parameter, opt, grad_scale: float, step: int, loss: float = 1.0):
    w.grad = torch.full_like(w, grad_scale)
    return guard.step([w], opt, loss, at_step=step)


def test_an_update_that_blows_up_the_weights_stops_the_run_at_once():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=1.0)
    guard = StepGuard(max_grad_norm=None, max_weight_growth=1.5)
    _, applied = _step(guard, w, opt, 0.1, step=1)  # |w| 2 -> 1.8: fine
    assert applied
    with pytest.raises(Blowup, match=r"grew the weight norm .*optim.max_weight_growth=1.5") as e:
        _step(guard, w, opt, -10.0, step=2)  # 0.9 -> 10.9 per element: 12x
    assert (e.value.step, e.value.suspect_from) == (2, 2)  # the update of step 2 itself did it
    v = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(Blowup, match="non-finite weights"):  # a finite gradient, an update past float32
        _step(StepGuard(None, max_weight_growth=1.5), v, torch.optim.SGD([v], lr=1e21), 1e18, step=1)


def test_grad_norm_spikes_are_skipped_and_a_streak_of_them_stops_the_run():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=1e-3)
    guard = StepGuard(max_grad_norm=1.0, max_bad_steps=3, max_grad_spike=100.0)
    for step in range(1, StepGuard.SPIKE_WARMUP + 1):
        assert _step(guard, w, opt, 1.0, step)[1]  # grad norm 2: the median
    before = w.detach().clone()
    norm, applied = _step(guard, w, opt, 150.0, step=6)  # norm 300 > 100 x 2
    assert not applied and norm == pytest.approx(300.0) and torch.equal(w.detach(), before)
    assert _step(guard, w, opt, 90.0, step=7)[1]  # 180 < 200: applied, the streak ends
    assert guard.suspect_from(7) == 7
    before = w.detach().clone()
    assert not _step(guard, w, opt, 1e3, 8)[1]  # a spike: skipped
    assert _step(guard, w, opt, 1e3, 9)[1]  # a second in a row: the weights' doing; applied, clipped to norm 1
    assert (before - w.detach()).tolist() == pytest.approx([1e-3 * 0.5] * 4, abs=1e-6)  # lr x the clipped gradient
    assert guard.suspect_from(9) == 7  # the update before the streak began may be the culprit
    with pytest.raises(Blowup, match=r"3 updates in a row had a gradient norm over optim.max_grad_spike=100 .*"
                                     r"skipped once, then applied clipped") as e:
        _step(guard, w, opt, 1e3, step=10)
    assert e.value.suspect_from == 7
    unclipped = StepGuard(max_grad_norm=None, max_bad_steps=3, max_grad_spike=100.0)  # no safe size to apply
    for step in range(1, StepGuard.SPIKE_WARMUP + 1):
        assert _step(unclipped, w, opt, 1.0, step)[1]
    assert not any(_step(unclipped, w, opt, 1e3, step)[1] for step in (6, 7))
    with pytest.raises(Blowup, match="and were skipped"):
        _step(unclipped, w, opt, 1e3, step=8)


def test_a_spike_the_weights_keep_producing_is_applied_clipped_and_mends_them():
    """Seen on the suite's caesar SFT: one update sent the loss 2.0 -> 3.0 and every later gradient to ~120x
    its median. Skipped, the weights never changed, five in a row stopped the run; the first clipped update
    took the loss back. Here the loss is w^2, so the gradient comes from the weights whatever the batch."""
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1e-3)
    guard = StepGuard(max_grad_norm=1.0, max_bad_steps=5, max_grad_spike=3.0)
    for step in range(1, StepGuard.SPIKE_WARMUP + 1):
        assert _step(guard, w, opt, 1.0, step)[1]  # grad norm 1: the median
    with torch.no_grad():
        w.fill_(10.0)  # an applied update sent the weights away
    opt.param_groups[0]["lr"] = 5.0

    def weights_step(step):
        w.grad = 2 * w.detach().clone()
        return guard.step([w], opt, float(w.detach() ** 2), at_step=step)

    assert weights_step(6) == (pytest.approx(20.0), False)  # 20 > 3 x 1: skipped, the weights stay at 10
    assert weights_step(7) == (pytest.approx(20.0), True) and w.item() == pytest.approx(5.0)  # applied, clipped
    assert weights_step(8) == (pytest.approx(10.0), True) and w.item() == pytest.approx(0.0, abs=1e-5)
    assert weights_step(9) == (pytest.approx(0.0, abs=1e-4), True)  # the weights mended: no spike
    assert guard.bad_in_a_row == 0 and guard.suspect_from(9) == 9


def test_spikes_wait_for_warmup_and_gradients_after_silence_are_not_spikes():
    """RL's first updates can have no signal (grad norm 0): the median is floored at the clip threshold."""
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=1e-3)
    guard = StepGuard(max_grad_norm=1.0, max_grad_spike=100.0)
    assert _step(guard, w, opt, 500.0, step=1)[1]  # no statistic yet
    for step in range(2, 12):
        assert _step(guard, w, opt, 0.0, step)[1]
    assert _step(guard, w, opt, 40.0, step=12)[1]  # norm 80 after silence: under 100 x max(0, 1)
    restored = StepGuard(max_grad_norm=1.0, max_grad_spike=100.0)
    restored.load_state_dict(guard.state_dict())
    assert restored.grad_norms == guard.grad_norms  # part of every checkpoint


# ---------------------------------------------------------------- keep_last and the trusted checkpoint


def test_keep_last_keeps_the_newest_trusted_checkpoint_and_a_stop_sets_the_rest_aside(tmp_path):
    run = RunDir(tmp_path / "run", {"seed": 0}, "sft")
    state = lambda s: {"model": {"w": torch.full((4,), float(s))}}  # noqa: E731
    names = lambda: sorted(p.name for p in run.checkpoints.glob("step-*"))  # noqa: E731
    try:
        for step in (1, 2, 3):  # no trouble: the newest is not confirmed yet, the one before it is
            run.suspect_from = step  # what loop.end_of_step sets from StepGuard.suspect_from
            run.save(step, state(step), {"step": step}, keep_last=1)
        assert names() == ["step-000002", "step-000003"]
        run.suspect_from = 3  # a streak of refused updates began at step 4: step 3's update is suspect
        for step in (4, 5):
            run.save(step, state(step), {"step": step}, keep_last=1)
        assert names() == ["step-000002", "step-000005"]  # keep_last=1 pruned 3 and 4, never 2
        resume_from, moved = run.set_aside(3)  # the run stopped: checkpoints of step 3 on are not trusted
        assert resume_from == run.checkpoints / "step-000002" and run.latest() == resume_from
        assert moved == ["step-000005"]
        assert names() == ["step-000002"] and [p.name for p in run.rejected.iterdir()] == ["step-000005"]
    finally:
        run.release()


# ---------------------------------------------------------------- run identity


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_the_same_directory_however_written_is_the_same_run_and_a_refused_rerun_writes_nothing(tmp_path,
                                                                                                tiny_model_dir):
    quick = [*QUICK_SFT, "checkpoint.every=1"]
    first = run_cli("sft", "output_dir=run", f"model.path={os.path.relpath(tiny_model_dir, tmp_path)}", *quick,
                    "max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    run, elsewhere = tmp_path / "run", tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)

    # absolute paths from another working directory (model.path too): the same run, resumed
    again = run_cli("sft", f"output_dir={run}", f"model.path={tiny_model_dir}", *quick, "max_steps=3", cwd=elsewhere)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming at step 2" in again.stdout + again.stderr
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3]

    # another experiment in the same run: refused, and not one byte of the run changes. Spelled relative to
    # yet another directory (model.path too), the run is still recognised: the one difference named is the seed
    before = tree_digest(run)
    assert ".hydra/config.yaml" in before and "config.json" in before
    for spelling, model, cwd in (("../../run", os.path.relpath(tiny_model_dir, elsewhere), elsewhere),
                                 (str(run), str(tiny_model_dir), tmp_path)):
        refused = run_cli("sft", f"output_dir={spelling}", f"model.path={model}", *quick, "max_steps=3", "seed=7",
                          cwd=cwd)
        assert_one_line_error(refused, "holds a run with a different config (seed: 0 -> 7);")
        assert tree_digest(run) == before, spelling


def test_only_safe_keys_may_change_on_a_rerun(tmp_path):
    """checkpoint.rerun_changes on a run dir with a checkpoint: which keys pass, which are refused."""
    config = {"output_dir": "run", "seed": 0, "max_steps": 10, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
              "eval": {"every": 5}, "data": {"train": None}}
    run = RunDir(tmp_path / "run", config, "sft")
    try:
        run.save(4, {"model": {"w": torch.zeros(2)}}, {"step": 4}, keep_last=2)
    finally:
        run.release()
    safe = {**config, "output_dir": str(tmp_path / "run"), "max_steps": 20, "optim": {**config["optim"], "lr": 1e-4},
            "eval": {"every": 1}}
    ckpt, changes = rerun_changes(tmp_path / "run", safe)
    assert ckpt.name == "step-000004"
    assert changes == {"max_steps": [10, 20], "optim.lr": [1e-3, 1e-4], "eval.every": [5, 1]}
    for key, value in (("seed", 1), ("optim", {"lr": 1e-3, "betas": [0.8, 0.95]}), ("data", {"train": "x.jsonl"})):
        with pytest.raises(UserError, match="holds a run with a different config"):
            rerun_changes(tmp_path / "run", {**config, key: value})


# ---------------------------------------------------------------- the same in train-rm and rl (slow)

SPREAD_REWARD = '''
def spread(prompt, response, **row):
    """Distinct values across a group of samples: every update has a signal, so the lr shows."""
    return float(sum(map(ord, response)) % 7)
'''
OTHER_STAGES = {
    "train-rm": lambda m: [f"model.path={m}", "data.num_train=32", "data.num_eval=8", "batch_size=4",
                           "model.max_length=96", "optim.warmup_steps=0", "eval.every=1000", "log_every=1"],
    "rl": lambda m: [f"policy.path={m}", "reward.functions=[spread_reward:spread]", "data.num_train=16",
                     "data.num_eval=4", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4",
                     "rollout.max_new_tokens=8", "eval.every=1000", "eval.max_new_tokens=4", "optim.warmup_steps=0",
                     "log_every=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(OTHER_STAGES))
def test_lr_explosion_in_train_rm_and_rl_resumes_with_a_lower_lr(tmp_path, tiny_model_dir, stage):
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    env = {"PYTHONPATH": str(tmp_path)}
    args = [*OTHER_STAGES[stage](tiny_model_dir), *CKPT_EVERY_STEP, "device=cpu", "device.threads=1"]
    first = run_cli(stage, "output_dir=run", *args, "max_steps=2", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "run"
    bad = run_cli(stage, "output_dir=run", *args, "max_steps=5", "optim.lr=1e4", cwd=tmp_path, env=env)
    ckpt = run / "checkpoints" / "step-000002"
    assert_one_line_error(bad, f"at step 3; stopped: the last checkpoint before it is {ckpt}")
    weights = "policy" if stage == "rl" else "model"
    assert max_abs(load_weights(ckpt / f"{weights}.safetensors")) < 5
    again = run_cli(stage, "output_dir=run", *args, "max_steps=5", "optim.lr=1e-4", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming at step 2" in again.stdout + again.stderr
    assert json.loads((run / "changes.jsonl").read_text().splitlines()[-1])["changes"] == {"optim.lr": [1e4, 1e-4]}
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4, 5]
