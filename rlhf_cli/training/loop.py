"""What every stage does around its own training step: run/teardown, resume, and the end-of-step tail.

Functions the recipes call (stages/sft.py, train_rm.py, rl.py), not a base class:

- `run_stage`: the runtime (devices, torch.distributed), the locked run dir, the
  recipe's setup and train, then the run dir released and torch.distributed torn down
  whatever happened.
- `resume`: the newest complete checkpoint, if any, into the models, optimizer,
  scheduler, RNG states and the recipe's own stateful objects; -> the step to continue at.
- `evaluate_before`, `train_steps`: the held-out evaluation at step 0, then the recipe's
  `train_step()` up to its total, each followed by
- `end_of_step(recipe, metrics)`: log, evaluate, honour a stop request (SIGTERM / SIGINT),
  checkpoint, barrier, in that order, on the cadences the config sets.

What they read of a recipe is the `Steps` protocol; an evaluation is an `Evaluation` (the
logged metrics, and the samples the closing table shows).

The step guard (optim.StepGuard) is one mechanism for the three stages: each recipe's update
goes through it; `end_of_step` tells the run dir which checkpoints it trusts (keep_last never
prunes the newest of them), and when it stops the run (optim.Blowup) `run_stage` sets the
untrusted checkpoints aside and names the one to resume from.

The phases a recipe names (`train`, `train_step` or RL's `rollout` / `score` /
`advantages` / `update`, `evaluate`) are what tests/test_faults.py kills inside.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from rlhf_cli.config import origin
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.training import checkpoint, optim, runtime, signals
from rlhf_cli.training.checkpoint import RunDir
from rlhf_cli.training.precision import check_trainable_dtype


class Recipe(Protocol):
    """What `run_stage` and the async learners (actors.py) rely on in a stage's recipe, and nothing more:
    made as make_recipe(cfg, rt, run_dir, t_start, **options), then setup() (data, models, optimizer, resume)
    and train() (the steps, evaluation, final/) -> the final metrics."""

    def setup(self) -> None: ...

    def train(self) -> dict: ...


def run_stage(stage: str, cfg, output_dir: Path, make_recipe: Callable[..., Recipe], model_key: str = "model",
              placement=None) -> dict:
    """make_recipe(cfg, rt, run_dir, t_start) -> a recipe; its setup() then train() -> the final metrics.

    model_key: the config group of the model that trains (its dtype is checked against its device first);
    placement: rl's per-model devices."""
    t_start = time.time()
    device_spec = (getattr(placement, model_key, None) if placement is not None else None) or cfg.device.type
    check_trainable_dtype(getattr(cfg, model_key), model_key, device_spec)
    rt = runtime.setup(cfg.device, cfg.seed, placement)  # every device resolved before anything loads
    try:
        return train_recipe(stage, cfg, output_dir, rt, make_recipe, t_start)
    finally:
        runtime.teardown()


def train_recipe(stage: str, cfg, output_dir: Path, rt, make_recipe: Callable[..., Recipe], t_start: float,
                 **options) -> dict:
    """The run dir (rank 0 locks it and says what changed since the run it resumes), the recipe made with
    `options`, its setup() and train(); a step-guard stop set aside as one error line -> the final metrics."""
    run_dir = RunDir(output_dir, dataclasses.asdict(cfg), stage, rt.is_main)
    if run_dir.changes and rt.is_main:
        print(f"{stage}: resuming with " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in run_dir.changes.items())
              + f" (safe to change; recorded in {run_dir.root / 'changes.jsonl'})", flush=True)
    try:
        recipe = make_recipe(cfg, rt, run_dir, t_start, **options)
        recipe.setup()
        try:
            return recipe.train()
        except optim.Blowup as e:
            raise stopped_by_guard(e, cfg, run_dir) from None
    finally:
        run_dir.release()


def stopped_by_guard(e: optim.Blowup, cfg, run_dir: RunDir) -> UserError:
    """The step guard stopped the run: set aside the checkpoints it does not trust -> the one-line error
    naming the checkpoint a rerun resumes from and the fix (a lower optim.lr, a safe-to-change key)."""
    resume_from, moved = run_dir.set_aside(e.suspect_from)
    fix = f"a lower learning rate, e.g. optim.lr={cfg.optim.lr / 10:g}"
    if resume_from is None:
        return UserError(f"{e.reason} at step {e.step}; stopped before any checkpoint: rerun the same command with "
                         f"{fix} (it starts afresh), or check the data, model weights and reward functions")
    aside = f"; {', '.join(moved)} moved to {run_dir.rejected}" if moved else ""
    return UserError(f"{e.reason} at step {e.step}; stopped: the last checkpoint before it is {resume_from}{aside}. "
                     f"Rerun the same command with {fix}, and it resumes from there (or check the data, model "
                     f"weights and reward functions)")


def resume(run_dir: RunDir, rt, parts: dict, optimizer, scheduler, precision, **stateful) -> int:
    """Load the newest complete checkpoint (none: a fresh run) -> its step (0 when fresh).

    parts: name -> (module, key prefix) as saved; stateful: name -> an object whose
    load_state_dict takes what the checkpoint holds under that name (sampler, KL controller,
    step guard ...; a name an older checkpoint lacks keeps its fresh state). The schedule goes on
    from the checkpoint's position with this run's peak learning rates: optim.lr may have changed.
    """
    ckpt = run_dir.latest(warn=print if rt.is_main else None)
    if ckpt is None:
        return 0
    configured = list(scheduler.base_lrs)
    state = checkpoint.load_checkpoint(ckpt, rt, parts, optimizer, scheduler, precision)
    use_learning_rates(optimizer, scheduler, configured)
    for name, obj in stateful.items():
        if name in state:
            obj.load_state_dict(state[name])
    return int(state["step"])


def use_learning_rates(optimizer, scheduler, base_lrs: list[float]) -> None:
    """Set the peak learning rates of a restored optimizer and LambdaLR (both carry the saved run's) and
    the current ones at the schedule's position: base x factor(step), as scheduler.step() computes them."""
    scheduler.base_lrs = list(base_lrs)
    current = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas)]
    for group, base, lr in zip(optimizer.param_groups, base_lrs, current):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = current


def batch_plan(cfg, rt, n_items: int) -> tuple[int, int]:
    """sft / train-rm: -> (global batch = per-device batch x accumulation x ranks, total steps:
    max_steps, else `epochs` passes over n_items). A batch larger than the data is refused."""
    check_batch_fits(cfg, rt.world_size, n_items)
    global_batch = cfg.batch_size * cfg.optim.grad_accum * rt.world_size
    return global_batch, cfg.max_steps or max(1, math.ceil(cfg.epochs * n_items / global_batch))


def check_batch_fits(cfg, world_size: int, n_train: int) -> None:
    """DataError when one step takes more training rows (sft, train-rm) or prompts (rl) than there are.

    An error, not a warning: such a batch holds the same rows twice, which only re-weights the gradient at
    the full cost, and `epochs` would count a single step as many passes; the fix is one key."""
    per_step, what, batch, fix = cfg.step_takes(world_size, n_train)  # the stage says what a step takes
    if per_step > n_train:
        raise DataError(f"data.train: a step takes {per_step} {what} ({batch}) but there are only {n_train} "
                        f"training {what}: every batch would repeat {what}; {fix}, or give more data")


def report(stage: str, rt, tracker, run_dir: RunDir, table: dict, step: int, t_start: float, samples_title: str,
           samples: list) -> None:
    """Rank 0 prints the held-out samples and the closing table (+ steps, wall time, final model); every
    rank closes its tracker."""
    if rt.is_main:
        table = {**table, "steps": step, "wall time (s)": round(time.time() - t_start, 1),
                 "final model": str(run_dir.final)}
        tracker.samples(samples_title, samples)
        tracker.table(f"{stage} results", table)
    tracker.close()


def announce_plan(stage: str, say, recipe) -> None:
    """The log lines every trained-model stage opens with after its batch line: the memory plan, the by-origin
    defaults the run took, the LoRA adapters."""
    say(f"{stage}: {recipe.memory.describe()}")
    said = origin.describe(stage, recipe.cfg, recipe.cfg.trained_model.path)
    if said:
        say(said)
    if recipe.adapters:
        say(f"{stage}: {recipe.adapters.describe()}")


def say_dropped_pairs(stage: str, say, max_length: int, splits: list[tuple[str, int, list]]) -> None:
    """One line a split (what, dropped, kept) that lost pairs longer than model.max_length (train-rm, dpo)."""
    for what, dropped, kept in splits:
        if dropped:
            say(f"{stage}: dropped {dropped} of {dropped + len(kept)} {what} pairs longer than "
                f"model.max_length={max_length} tokens (raise model.max_length to keep them)")


def before_after(results: dict, before: dict, rows: dict[str, str]) -> dict:
    """The closing table's rows: for each logged key (-> its words) the held-out value before and after training
    (a resumed run's before is not known)."""
    table = {}
    for key, what in rows.items():
        if key in results:
            table[f"held-out {what} before"] = before.get(key, "(resumed)")
            table[f"held-out {what} after"] = results[key]
    return table


@dataclass
class Evaluation:
    """A held-out evaluation: what metrics.jsonl logs (kind eval; {} on ranks other than 0) and the samples the
    closing table shows."""
    metrics: dict
    samples: list = field(default_factory=list)


class Steps(Protocol):
    """What the shared loop (`evaluate_before`, `train_steps`, `end_of_step`) reads of a recipe."""
    cfg: object
    rt: object
    run_dir: RunDir
    tracker: object  # tracking.Tracker
    guard: optim.StepGuard  # says from which step on checkpoints are not trusted yet
    step: int  # optimizer steps done
    total_steps: int

    def train_step(self) -> dict: ...  # one optimizer step (step += 1) -> its metrics

    def evaluate(self) -> Evaluation: ...

    def save_checkpoint(self) -> None: ...


def save_checkpoint(recipe, **stateful) -> None:
    """The recipe's checkpoint (collective; rank 0 writes): its `parts`, optimizer, schedule and loss scaler, its
    sampler and step guard, and `stateful` (name -> an object with state_dict(); `resume` loads them back)."""
    states = {"sampler": recipe.sampler, **stateful, "guard": recipe.guard}
    checkpoint.save_checkpoint(recipe.run_dir, recipe.rt, recipe.step, recipe.parts, recipe.optimizer,
                               recipe.scheduler, recipe.cfg.checkpoint.keep_last, recipe.precision,
                               **{name: obj.state_dict() for name, obj in states.items()})


def final_manifest(recipe, stage: str, last: Evaluation, before: Evaluation) -> dict:
    """What every stage's final/ manifest holds: the stage, the run, the model it started from and that model's
    run, the config and the defaults it derived, the data's fingerprint, the steps, the held-out metrics before
    and after, the world size."""
    cfg = recipe.cfg
    start = cfg.trained_model.path
    return {"stage": stage, "run_dir": str(recipe.run_dir.root.resolve()), "parent_model": start or "embedded tiny model",
            "parent_run": checkpoint.read_manifest(start).get("run_dir"), "config": dataclasses.asdict(cfg),
            "derived_defaults": list(cfg.derived), "data_fingerprint": checkpoint.fingerprint(recipe.train_rows),
            "steps": recipe.step, "metrics": last.metrics, "metrics_before": before.metrics,
            "world_size": recipe.rt.world_size}


def evaluate_before(recipe: Steps) -> Evaluation:
    """A fresh run's held-out evaluation at step 0, logged; a resumed run's is empty."""
    if recipe.step:
        return Evaluation({})
    before = recipe.evaluate()
    if before.metrics:
        recipe.tracker.log(0, before.metrics, kind="eval")
    return before


def train_steps(recipe: Steps) -> Evaluation:
    """The recipe's steps up to its total, each with the end-of-step tail -> the last evaluation (the final one:
    the last step always evaluates)."""
    last = None
    while recipe.step < recipe.total_steps:
        evaluated = end_of_step(recipe, recipe.train_step())
        last = evaluated if evaluated is not None else last
    return last if last is not None else recipe.evaluate()


def end_of_step(recipe: Steps, metrics: dict) -> Evaluation | None:
    """After optimizer step `recipe.step` (1-based): log, evaluate, stop request, checkpoint, barrier, on the
    cadences the recipe's config sets.

    Collective (every rank calls it). Returns the evaluation when it evaluated (empty metrics on ranks other
    than 0), else None. Raises signals.Interrupted after checkpointing when a SIGTERM / SIGINT arrived before
    the last step.
    """
    cfg, rt, step, tracker = recipe.cfg, recipe.rt, recipe.step, recipe.tracker
    last = step == recipe.total_steps
    if step % cfg.log_every == 0 or last:
        tracker.log(step, metrics)
    else:
        tracker.advance(step)
    evaluated = None
    if step % cfg.eval.every == 0 or last:
        evaluated = recipe.evaluate()
        tracker.log(step, evaluated.metrics, kind="eval")
    stop = signals.stop_requested(rt)  # SIGTERM / SIGINT: checkpoint this step, then exit 143 / 130
    if step % cfg.checkpoint.every == 0 or last or stop:  # collective; rank 0 writes
        recipe.run_dir.suspect_from = recipe.guard.suspect_from(step)  # keep_last never prunes the newest trusted
        recipe.save_checkpoint()
    rt.barrier()
    if stop and not last:
        raise signals.stopped(stop, step, recipe.total_steps, recipe.run_dir)
    return evaluated
