"""Nothing lost (issue 6): kill -9, SIGTERM / SIGINT, corrupt checkpoints, keep_last, NaN/inf steps,
two runs at one output_dir, safe loading. Every run is a real `python -m rlhf_cli` subprocess on the
tiny model.

    .venv/bin/pytest -q tests/test_faults.py              # 5 kills per stage (+ SIGTERM and SIGINT)
    .venv/bin/pytest -q -s -m slow tests/test_faults.py   # 20 kills per stage; -s prints the figures

Kills land at seeded random moments of four kinds: inside a training step and inside an evaluation
(a sampler thread sees the main thread there), inside a checkpoint write (at a random file event
after the write began: after the tensors, between fsyncs, before the manifest, before the rename),
and from outside at a random delay after a random step. The in-process ones come from a test-only
`sitecustomize` put on PYTHONPATH (FAULT_KILL=...); the package itself has no test hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_one_line_error, run_cli
from helpers import FAULTS_COMMON as COMMON, FAULTS_SFT as QUICK_SFT
from helpers import assert_same_weights, read_metrics
from helpers import write_jsonl as _write_jsonl

INJECTOR = r'''
"""Test-only fault injector (tests/test_faults.py): SIGKILLs this process at the moment FAULT_KILL names.
checkpoint:N:E  the E-th file event after the N-th checkpoint write began
step:N, eval:N  the N-th time the main thread is seen entering a training step / an evaluation"""
import os, signal, sys, threading, time

plan = os.environ.get("FAULT_KILL", "")
if plan:
    kind, *nums = plan.split(":")
    nums = [int(x) for x in nums]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "checkpoint":
        seen = {"saves": 0, "events": 0}

        def hook(event, args):
            if event not in ("open", "os.rename", "os.remove", "shutil.rmtree", "os.mkdir"):
                return
            if event == "os.mkdir" and ".tmp-step-" in str(args[0]):
                seen["saves"] += 1
            if seen["saves"] >= nums[0]:
                seen["events"] += 1
                if seen["events"] >= nums[1]:
                    die()

        sys.addaudithook(hook)
    else:
        # the recipes' named phases (qualified method names; RECIPE_PHASES, checked by a test)
        TRAIN, STEP, EVAL = (set(PHASES[k]) for k in ("train", "step", "eval"))

        def phase(frame):
            names = set()
            while frame is not None:
                names.add(frame.f_code.co_qualname)
                frame = frame.f_back
            if not names & TRAIN:
                return None
            if names & EVAL:
                return "eval"
            return "step" if names & STEP else None

        def watch():
            main = threading.main_thread().ident
            entries, inside, started = 0, False, False
            while True:
                frame = sys._current_frames().get(main)
                now = phase(frame) == kind
                entries += now and not inside
                inside = now
                if now and entries >= nums[0]:
                    die()
                if not started:  # imports and model loading: look rarely, so as not to slow them down
                    f = frame
                    while f is not None and f.f_code.co_qualname not in TRAIN:
                        f = f.f_back
                    started = f is not None
                time.sleep(0.0005 if started else 0.05)

        threading.Thread(target=watch, daemon=True).start()
'''

# The phases of the recipes the injector kills inside: the loop (`train`), a training step (RL: its
# steps 1-4), an evaluation. Qualified method names of the recipe classes in rlhf_cli/stages/.
RECIPE_PHASES = {
    "train": ["SFTRecipe.train", "RewardModelRecipe.train", "DPORecipe.train", "RLRecipe.train"],
    "step": ["SFTRecipe.train_step", "RewardModelRecipe.train_step", "DPORecipe.train_step", "RLRecipe.rollout",
             "RLRecipe.score", "RLRecipe.advantages", "RLRecipe.update"],
    "eval": ["SFTRecipe.evaluate", "RewardModelRecipe.evaluate", "DPORecipe.evaluate", "RLRecipe.evaluate"],
}
INJECTOR = INJECTOR.replace("if plan:", f"PHASES = {RECIPE_PHASES!r}\nif plan:", 1)


def test_the_injectors_phases_are_methods_of_the_recipes():
    from rlhf_cli.stages import dpo, rl, sft, train_rm

    classes = {c.__name__: c for c in (sft.SFTRecipe, train_rm.RewardModelRecipe, dpo.DPORecipe, rl.RLRecipe)}
    for names in RECIPE_PHASES.values():
        for name in names:
            cls, method = name.split(".")
            assert callable(getattr(classes[cls], method, None)), f"{name} is not a recipe method: the injector would never fire"
            assert getattr(classes[cls], method).__qualname__ == name


STAGE_ARGS = {
    "sft": lambda model: [f"model.path={model}", "data.num_train=32", "data.num_eval=4", "batch_size=4",
                          "model.max_length=64", "optim.warmup_steps=0", *COMMON],
    "train-rm": lambda model: [f"model.path={model}", "data.num_train=32", "data.num_eval=8", "batch_size=4",
                               "model.max_length=96", "optim.warmup_steps=0", *COMMON],
    "dpo": lambda model: [f"model.path={model}", "data.num_train=32", "data.num_eval=4", "batch_size=4",
                          "model.max_length=96", "optim.warmup_steps=0", *COMMON],
    "rl": lambda model: [f"policy.path={model}", "reward.functions=[faultrewards:digits]", "data.num_train=16",
                         "data.num_eval=4", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                         "rollout.max_new_tokens=8", *COMMON],
}


def max_steps_for(kills: int) -> int:
    return 7 * kills + 8  # one launch gets at most ~7 steps further before its kill


def env(helpers: Path, **extra) -> dict:
    path = os.pathsep.join([str(helpers), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "RLHF_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def command(stage: str, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlhf_cli", stage, f"output_dir={out}", *args]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def complete_checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "manifest.json").exists())


def verifies(ckpt: Path) -> bool:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    return all((ckpt / n).exists() and sha256(ckpt / n) == h for n, h in manifest["files"].items())


def step_of(ckpt: Path | None) -> int:
    return int(ckpt.name.split("-")[1]) if ckpt else 0


def train_steps(run: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run, "train")]  # a line torn by a kill is skipped


# A rule reward that varies on the tiny untrained policy (the task's correctness rule is 0 for every
# sample there, so RL would never move the weights and "bit-identical" would prove nothing).
REWARDS = '''
from rlhf_cli.task import correctness_reward

calls = 0

def digits(prompt, response, **row):
    return float(sum(ch.isdigit() for ch in response))

def goes_bad(prompt, response, **row):
    global calls
    calls += 1
    if calls > 8:  # 2 steps of 2 prompts x 2 samples, then it goes bad
        return 1e39  # a finite Python float that is inf in float32
    return digits(prompt, response)
'''


@pytest.fixture(scope="module")
def injector(tmp_path_factory) -> Path:
    """A PYTHONPATH dir: the fault injector (inert unless FAULT_KILL is set) and the rule rewards."""
    d = tmp_path_factory.mktemp("injector")
    (d / "sitecustomize.py").write_text(INJECTOR)
    (d / "faultrewards.py").write_text(REWARDS)
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, injector) -> dict:
    """Uninterrupted runs of every stage at the fault settings (default kill count), launched together."""
    root = tmp_path_factory.mktemp("reference")
    steps = max_steps_for(5)
    procs = {}
    for stage, args in STAGE_ARGS.items():
        procs[stage] = subprocess.Popen(command(stage, root / stage, [*args(tiny_model_dir), f"max_steps={steps}"]),
                                        cwd=root, env=env(injector), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
    for stage, p in procs.items():
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        assert train_steps(root / stage) == list(range(1, steps + 1))
    return {stage: root / stage for stage in procs}


# ---------------------------------------------------------------- kill -9, SIGTERM, SIGINT


class Chain:
    """One stage: launch the same command again and again, each launch ended by a planned fault."""

    def __init__(self, stage, run, args, injector, rng):
        self.stage, self.run, self.args, self.injector, self.rng = stage, run, args, injector, rng
        self.kills, self.landed, self.resume_s, self.launches = 0, [], [], 0
        self.last_pid, self.leftovers_before = None, set()

    def plan(self, kind: str) -> dict:
        r = self.rng
        return {"step": lambda: {"FAULT_KILL": f"step:{r.randint(1, 4)}"},
                "eval": lambda: {"FAULT_KILL": f"eval:{r.randint(1, 2)}"},
                "checkpoint": lambda: {"FAULT_KILL": f"checkpoint:{r.randint(1, 2)}:{r.randint(2, 8)}"},
                "outside": lambda: {"after_steps": r.randint(1, 4), "delay_s": r.uniform(0, 0.03), "signal": "SIGKILL"},
                "SIGTERM": lambda: {"after_steps": r.randint(1, 3), "delay_s": r.uniform(0, 0.03), "signal": "SIGTERM"},
                "SIGINT": lambda: {"after_steps": r.randint(1, 3), "delay_s": r.uniform(0, 0.03), "signal": "SIGINT"},
                "none": lambda: {}}[kind]()

    def launch(self, kind: str) -> subprocess.CompletedProcess:
        plan = self.plan(kind)
        before = complete_checkpoints(self.run)
        self.leftovers_before = set((self.run / "checkpoints").glob(".tmp-step-*"))
        assert all(verifies(c) for c in before), f"{self.stage}: a complete checkpoint does not verify: {before}"
        expected_resume = step_of(before[-1] if before else None)
        metrics = self.run / "metrics.jsonl"
        old_inode = metrics.stat().st_ino if metrics.exists() else None
        extra = {k: v for k, v in plan.items() if k == "FAULT_KILL"}
        log = self.run.parent / f"{self.stage}-launch-{self.launches}.log"
        self.launches += 1
        t0 = time.perf_counter()
        with open(log, "w") as f:
            f.write(f"# fault plan: {kind} {plan}\n")
            f.flush()
            p = subprocess.Popen(command(self.stage, self.run, self.args), cwd=self.run.parent,
                                 env=env(self.injector, **extra), stdout=f, stderr=subprocess.STDOUT)
            self.last_pid = p.pid
            first_step_s, seen, done = None, None, []
            while p.poll() is None:  # watch progress: the new metrics file (the resume rewrites it) grows
                stat = metrics.stat() if metrics.exists() else None
                if stat and stat.st_ino != old_inode and (stat.st_ino, stat.st_size) != seen:
                    seen = (stat.st_ino, stat.st_size)
                    done = [s for s in train_steps(self.run) if s > expected_resume]
                if done and first_step_s is None:
                    first_step_s = time.perf_counter() - t0
                if "signal" in plan and done and max(done) >= expected_resume + plan["after_steps"]:
                    time.sleep(plan["delay_s"])
                    p.send_signal(getattr(signal, plan["signal"]))
                    p.wait(timeout=300)
                    break
                time.sleep(0.01)
            p.wait(timeout=600)
        out = log.read_text()
        if first_step_s is not None:
            self.resume_s.append(first_step_s)
        header = re.search(rf"^{re.escape(self.stage)}: .*", out, re.M)
        if header:  # got far enough to say where it starts: the newest complete checkpoint, nothing older
            resumed = re.search(r"resuming at step (\d+)", out)
            assert (int(resumed.group(1)) if resumed else 0) == expected_resume, (plan, out)
        assert "Traceback" not in out, out
        return subprocess.CompletedProcess(p.args, p.returncode, out, "")

    def check_after_stop(self, kind: str, proc) -> None:
        """SIGTERM / SIGINT: exit 143 / 130, one plain line saying where and how to resume, no step lost."""
        code = {"SIGTERM": 143, "SIGINT": 130}[kind]
        assert proc.returncode == code, proc.stdout
        lines = [line for line in proc.stdout.splitlines() if line.startswith("stopped by")]
        assert len(lines) == 1 and f"stopped by {kind} after step" in lines[0], proc.stdout
        assert "resume with the same command: python -m rlhf_cli " + self.stage in lines[0], lines[0]
        assert f"output_dir={self.run}" in lines[0]
        stopped_at = int(re.search(r"after step (\d+)", lines[0]).group(1))
        newest = complete_checkpoints(self.run)[-1]
        assert step_of(newest) == stopped_at == max(train_steps(self.run)), "a completed step was lost"
        assert verifies(newest) and not (self.run / ".lock").exists()  # released on the way out


def run_chain(stage, tmp: Path, model_dir, injector, seed: int, kills: int, reference_run: Path | None,
              stops: tuple[str, ...]) -> dict:
    rng = random.Random(f"{seed}-{stage}")
    steps = max_steps_for(kills)
    args = [*STAGE_ARGS[stage](model_dir), f"max_steps={steps}"]
    run = tmp / stage / "run"
    run.parent.mkdir(parents=True)
    if reference_run is None:  # the slow variant makes its own uninterrupted run
        ref = run.parent / "reference"
        proc = subprocess.run(command(stage, ref, args), cwd=run.parent, env=env(injector), capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        reference_run = ref
    chain = Chain(stage, run, args, injector, rng)
    kinds = ["step", "eval", "checkpoint", "outside"] + [rng.choice(["step", "eval", "checkpoint", "outside"])
                                                         for _ in range(kills - 4)]
    rng.shuffle(kinds)
    for stop in stops:  # SLURM preemption / Ctrl-C between the kills
        kinds.insert(rng.randint(1, len(kinds)), stop)
    for kind in kinds:
        proc = chain.launch(kind)
        if kind in ("SIGTERM", "SIGINT"):
            chain.check_after_stop(kind, proc)
            continue
        assert proc.returncode == -signal.SIGKILL, f"{kind} kill did not happen (rc {proc.returncode}):\n{proc.stdout}"
        chain.kills += 1
        leftovers = set((run / "checkpoints").glob(".tmp-step-*")) - chain.leftovers_before
        chain.landed.append("checkpoint write" if leftovers else kind)
        # kill -9 leaves its lock file behind (a dead pid); the next launch takes it over
        assert json.loads((run / ".lock").read_text())["pid"] == chain.last_pid
    proc = chain.launch("none")  # the same command once more, left alone: it completes
    assert proc.returncode == 0, proc.stdout
    assert chain.kills >= kills
    assert_same_weights(reference_run / "final" / "model.safetensors", run / "final" / "model.safetensors")
    key = "model.embed_tokens.weight"  # and the weights did train, so "identical" means something
    assert not torch.equal(load_file(run / "final" / "model.safetensors")[key],
                           load_file(Path(model_dir) / "model.safetensors")[key])
    assert train_steps(run) == list(range(1, steps + 1)), "lost or repeated steps in metrics.jsonl"
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))  # debris cleaned up
    return {"stage": stage, "kills": chain.kills, "survived": chain.kills, "landed": chain.landed,
            "launches": chain.launches, "resume_s": chain.resume_s}


def run_chains(tmp, model_dir, injector, kills, references, stops: dict) -> list[dict]:
    """The chains of the stages `stops` names, side by side (each a sequence of launches); failures re-raised."""
    results, errors = {}, {}

    def one(stage):
        try:
            results[stage] = run_chain(stage, tmp, model_dir, injector, 0, kills, references.get(stage), stops[stage])
        except BaseException as e:  # noqa: BLE001 - re-raised below with the stage name
            errors[stage] = e

    threads = [threading.Thread(target=one, args=(s,)) for s in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results.values():  # the figures for the notes (pytest -s shows them)
        resume = sorted(r["resume_s"])
        print(f"\n{r['stage']}: {r['kills']} kill -9 tried, {r['survived']} survived, landed {r['landed']}; "
              f"{r['launches']} launches; relaunch to first new step: median {resume[len(resume) // 2]:.1f} s, "
              f"max {resume[-1]:.1f} s")
    for stage, e in errors.items():
        raise AssertionError(f"{stage}: {e}") from e
    return list(results.values())


@pytest.mark.slow  # the default run's time on a 2-core machine (make test-slow runs it; session 18's note)
def test_kill_9_sigterm_and_sigint_at_random_moments_end_bit_identical(tmp_path, tiny_model_dir, injector, reference):
    # one stop signal per stage here (each loop checks the same flag); the slow variant sends both everywhere
    stops = {"sft": ("SIGTERM",), "train-rm": ("SIGINT",), "dpo": ("SIGINT",), "rl": ("SIGTERM",)}
    results = run_chains(tmp_path, tiny_model_dir, injector, 5, reference, stops)
    for r in results:
        assert r["kills"] >= 5
        assert {"step", "eval", "checkpoint write"} <= set(r["landed"]), r  # every kind of moment was hit


@pytest.mark.slow
def test_twenty_kills_per_stage_end_bit_identical(tmp_path, tiny_model_dir, injector):
    results = run_chains(tmp_path, tiny_model_dir, injector, 20, {}, {s: ("SIGTERM", "SIGINT") for s in STAGE_ARGS})
    for r in results:
        assert r["kills"] >= 20


# ---------------------------------------------------------------- corrupt, partial and pruned checkpoints


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_truncated_checkpoint_is_reported_and_skipped_for_the_previous_one(tmp_path, tiny_model_dir):
    args = [f"model.path={tiny_model_dir}", *QUICK_SFT, "max_steps=4", "checkpoint.every=1", "checkpoint.keep_last=3"]
    first = run_cli("sft", "output_dir=run", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    straight = (run / "final" / "model.safetensors").read_bytes()
    newest = complete_checkpoints(run)[-1]
    assert newest.name == "step-000004" and verifies(newest)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write the manifest predates
    assert not verifies(newest)
    again = run_cli("sft", "output_dir=run", *args, cwd=tmp_path)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert f"checkpoint {newest} is corrupt" in out and "resuming at step 3" in out, out
    assert verifies(run / "checkpoints" / "step-000004")  # redone and replaced
    assert (run / "final" / "model.safetensors").read_bytes() == straight  # step 4 redone exactly


def _tiny_state(seed: int) -> dict:
    return {"w": torch.randn(64, generator=torch.Generator().manual_seed(seed))}


def test_keep_last_never_deletes_the_only_good_checkpoint(tmp_path):
    from rlhf_cli.training.checkpoint import RunDir

    run = RunDir(tmp_path / "run", {"seed": 0}, "sft")
    try:
        for step in (6, 8):  # a run reached step 8 ...
            run.save(step, {"model": _tiny_state(step)}, {"step": step}, keep_last=3)
        torn = run.checkpoints / "step-000008" / "model.safetensors"
        torn.write_bytes(torn.read_bytes()[:100])  # ... and its newest checkpoint was torn
        assert run.latest() == run.checkpoints / "step-000006"
        # resumed from step 6, it writes step 7 with keep_last=1: the newest by name (8) is corrupt, so the
        # newest good one (7) must stay, and 6 may go
        run.save(7, {"model": _tiny_state(7)}, {"step": 7}, keep_last=1)
        names = sorted(p.name for p in run.checkpoints.iterdir())
        assert names == ["step-000007", "step-000008"], names
        assert run.latest() == run.checkpoints / "step-000007"
        tensors, state = RunDir.load(run.latest(), ["model"])
        assert torch.equal(tensors["model"]["w"], _tiny_state(7)["w"]) and state == {"step": 7}
        # with only corrupt ones beside it, a fresh good checkpoint prunes normally
        run.save(9, {"model": _tiny_state(9)}, {"step": 9}, keep_last=1)
        assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-000009"]
    finally:
        run.release()


# ---------------------------------------------------------------- two runs at one output_dir


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_lock_is_exclusive_and_a_dead_runs_lock_is_taken_over(tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.training.checkpoint import RunDir

    root = tmp_path / "run"
    root.mkdir()
    (root / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))  # left by a kill -9
    first = RunDir(root, {"seed": 0}, "sft")
    assert json.loads((root / ".lock").read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        RunDir(root, {"seed": 1}, "sft")  # a second holder, even a different config, is refused first
    assert json.loads((root / "config.json").read_text()) == {"seed": 0}  # and wrote nothing
    first.release()
    assert not (root / ".lock").exists()
    RunDir(root, {"seed": 0}, "sft").release()  # free again


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_second_run_at_the_same_output_dir_refuses_while_the_first_goes_on(tmp_path, tiny_model_dir):
    args = [f"model.path={tiny_model_dir}", *QUICK_SFT, "max_steps=3"]
    first = subprocess.Popen(command("sft", tmp_path / "run", args), cwd=tmp_path, env=env(tmp_path),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "run" / ".lock"
    try:
        deadline = time.time() + 300
        config_json = tmp_path / "run" / "config.json"  # written right after the lock is taken
        while not (config_json.exists() and lock.exists()) and first.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # hold it inside its run, lock taken
        assert json.loads(lock.read_text())["pid"] == first.pid
        config = config_json.read_text()
        for extra in ([], ["optim.lr=0.1"]):  # the same command, and a different experiment
            second = run_cli("sft", "output_dir=run", *args, *extra, cwd=tmp_path)
            assert_one_line_error(second, f"is in use by another run (pid {first.pid} on")
        assert config_json.read_text() == config
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert train_steps(tmp_path / "run") == [1, 2, 3] and not lock.exists()


# ---------------------------------------------------------------- NaN / inf


def test_a_non_finite_step_is_not_applied_and_the_run_goes_on(tmp_path, tiny_model_dir):
    """One pair of 16 has margin 1e39: finite as a Python float, inf in float32, so the batch holding it has
    an inf loss. That step is skipped (weights and optimizer untouched); the others train."""
    from rlhf_cli import task

    rows = task.preference_rows(16, seed=0)
    rows[5] = {**rows[5], "margin": 1e39}
    train = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    held_out = _write_jsonl(tmp_path / "eval.jsonl", task.preference_rows(8, seed=0, split="eval", n_eval=8))
    proc = run_cli("train-rm", "output_dir=run", f"model.path={tiny_model_dir}", f"data.train={train}",
                   f"data.eval={held_out}", "batch_size=4", "max_steps=8", "checkpoint.every=1",
                   "checkpoint.keep_last=9", "eval.every=1000", "log_every=1", "optim.warmup_steps=0", "device=cpu",
                   "device.threads=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows_logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    applied = {r["step"]: r["applied"] for r in rows_logged if r["kind"] == "train"}
    bad = [s for s, a in applied.items() if not a]
    assert len(bad) == 2 and len(applied) == 8, applied  # the poisoned pair once per 4-step epoch
    ckpt = lambda s: load_file(tmp_path / "run" / "checkpoints" / f"step-{s:06d}" / "model.safetensors")  # noqa: E731
    for step in range(2, 9):
        before, after = ckpt(step - 1), ckpt(step)
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same == (step in bad), (step, bad)  # skipped steps change nothing, applied ones change weights


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_bad_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, tiny_model_dir, injector):
    """A reward function that returns 1e39 from step 3 on (finite in Python, inf in float32): every update
    from then on has a NaN loss, is skipped, and the third in a row stops the run. Step 2's update may have
    caused the streak (a loss is computed on the previous update's weights), so the checkpoints from step 2
    on are set aside in checkpoints/rejected/ and the error names step 1's, which a rerun resumes from."""
    bad = run_cli("rl", "output_dir=run", *STAGE_ARGS["rl"](tiny_model_dir), "reward.functions=[faultrewards:goes_bad]",
                  "checkpoint.every=1", "checkpoint.keep_last=9", "optim.max_bad_steps=3", "max_steps=10",
                  "algorithm.dynamic_sampling=false",  # goes_bad counts its calls: one draw of 4 responses a step
                  cwd=tmp_path, env={"PYTHONPATH": str(injector)})
    assert_one_line_error(bad, "3 updates in a row had a NaN/inf loss or gradient")
    run = tmp_path / "run"
    assert "optim.max_bad_steps=3" in bad.stderr and "at step 5; stopped" in bad.stderr
    assert f"the last checkpoint before it is {run / 'checkpoints' / 'step-000001'}" in bad.stderr
    assert not (run / "final").exists()
    checkpoints = complete_checkpoints(run)
    assert [step_of(c) for c in checkpoints] == [1] and verifies(checkpoints[0])
    rejected = sorted((run / "checkpoints" / "rejected").iterdir())
    assert [step_of(c) for c in rejected] == [2, 3, 4]  # step 5, the third bad one, stopped the run
    first, last_applied = (load_file(d / "policy.safetensors") for d in (checkpoints[0], rejected[0]))
    assert any(not torch.equal(first[k], last_applied[k]) for k in first)  # good steps trained ...
    for ckpt in rejected[1:]:  # ... the skipped updates wrote nothing into the weights
        weights = load_file(ckpt / "policy.safetensors")
        assert all(torch.equal(weights[k], last_applied[k]) for k in last_applied)
    train = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[2]["score"] > 1e30  # inf is logged as 1e308


# ---------------------------------------------------------------- safe loading


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling it creates the marker file


def test_checkpoint_state_with_pickled_code_is_refused_and_never_runs(tmp_path):
    from rlhf_cli.errors import UserError
    from rlhf_cli.training.checkpoint import RunDir

    run = RunDir(tmp_path / "run", {"seed": 0}, "sft")
    try:
        ckpt = run.save(1, {"model": _tiny_state(1)}, {"step": 1}, keep_last=2)
        marker = tmp_path / "code-ran"
        torch.save({"step": 1, "payload": _RunsCode(marker)}, ckpt / "trainer_state.pt")
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["trainer_state.pt"] = sha256(ckpt / "trainer_state.pt")  # checksums agree: a crafted file
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        assert run.latest() == ckpt
        with pytest.raises(UserError, match="safe loading refused it"):
            RunDir.load(ckpt, ["model"])
        assert not marker.exists()
    finally:
        run.release()


def test_source_loads_only_safely():
    """Trainer state only via torch.load(weights_only=True); no pickle; trust_remote_code never forced on;
    modules imported only from the config's dotted paths (rewards, engines, environments) or the CLI's fixed
    stage table."""
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in (REPO / "rlhf_cli").rglob("*.py")}
    for name, text in sources.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (name, call)
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b", text), name
        assert not re.search(r"trust_remote_code\s*=\s*True", text), name
        assert not re.search(r"\b(eval|exec)\(", text.replace("model.eval(", "").replace(".eval()", "")), name
        imports = re.findall(r"import_module\(([^)]*)\)", text)
        allowed = {"rlhf_cli/rewards/__init__.py": ["module_name"], "rlhf_cli/cli.py": ["STAGES[stage][0]", "TOOLS[name][0]"],
                   "rlhf_cli/engines/rollout.py": ["module_name"],  # ENGINES' fixed "module:Class" entries, a user's
                   "rlhf_cli/envs/__init__.py": ["module_name"]}  # env.name's dotted path, as reward functions
        assert all(i in allowed.get(name, []) for i in imports), (name, imports)
    from rlhf_cli.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


PRUNE_KILL = r'''
import os, signal, sys
from pathlib import Path

import torch

from rlhf_cli.training.checkpoint import RunDir

run = RunDir(Path(sys.argv[1]), {"seed": 0}, "sft")
for step in (1, 2):
    run.save(step, {"model": {"w": torch.full((64,), float(step))}}, {"step": step}, keep_last=2)


pruning = []


def hook(event, args):  # SIGKILL at the first file removed once step 1's rmtree began: mid-prune
    if event == "shutil.rmtree" and "step-000001" in str(args[0]):
        pruning.append(True)
    elif event == "os.remove" and pruning:
        os.kill(os.getpid(), signal.SIGKILL)


sys.addaudithook(hook)
run.save(3, {"model": {"w": torch.full((64,), 3.0)}}, {"step": 3}, keep_last=2)  # prunes step 1
'''


def test_a_kill_while_pruning_leaves_no_checkpoint_that_looks_complete(tmp_path):
    """keep_last prunes old checkpoints; a kill -9 in the middle of deleting one must not leave a directory
    with its manifest but not its files (it would look complete and fail its checksums: found by the twenty-
    kills test under load). The real process is killed at the first file removal of the pruned checkpoint."""
    from rlhf_cli.training.checkpoint import RunDir, complete_checkpoints

    (tmp_path / "prune_kill.py").write_text(PRUNE_KILL)
    proc = subprocess.run([sys.executable, str(tmp_path / "prune_kill.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr  # the kill happened, mid-prune
    checkpoints = tmp_path / "run" / "checkpoints"
    complete = complete_checkpoints(checkpoints)
    assert [c.name for c in complete] == ["step-000002", "step-000003"], sorted(p.name for p in checkpoints.iterdir())
    assert all(verifies(c) for c in complete)
    run = RunDir(tmp_path / "run", {"seed": 0}, "sft")  # the next run sweeps the dead process's debris
    try:
        run.save(4, {"model": {"w": torch.full((64,), 4.0)}}, {"step": 4}, keep_last=2)
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003", "step-000004"]
    finally:
        run.release()
