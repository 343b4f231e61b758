"""Hydra multirun sweeps (`rlhf <stage> -m k=a,b`): job dirs, failed jobs, the closing summary.

    rlhf rl -m algorithm=reinforce,ppo seed=1,2 output_dir=runs/algos
    # -> runs/algos/algorithm-ppo+seed-1/ ... one dir per job, named by the swept keys only
    rlhf plot runs/algos                       # every job, one line each

- A job dir is named `key-value` per swept key, joined by `+` (the conf/*.yaml
  `hydra.job.config.override_dirname` settings): no `=` or `,`, so the name
  passes back as a path anywhere (`policy.path=runs/algos/algorithm-ppo+seed-1/final`).
- A job that fails (bad data, a crash) is reported with its overrides and the
  sweep goes on; a SIGTERM / SIGINT still stops the whole sweep.
- At the end a table: job, status, final metrics; the exit status is non-zero
  when any job failed (1, or the user error's 2 when every failure was one).
- A sweep is refused in a directory that already holds a single run (its jobs
  would land inside that run, and `rlhf plot` would show only the run), and a
  single run in a directory that holds a sweep.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_cli.errors import ConfigError, UserError
from rlhf_cli.training.tracking import console, fmt_value

FINAL_KEYS = 4  # final metrics shown per job in the summary (eval_ first)


@dataclass
class JobResult:
    number: int
    overrides: list[str]  # the swept key=value pairs of this job
    run_dir: Path
    status: str = "ok"
    metrics: dict = field(default_factory=dict)
    error: str = ""
    exit_code: int = 0


RESULTS: list[JobResult] = []  # the jobs of this process's sweep, in order


def register_resolvers() -> None:
    """`${path_safe:...}` (conf/*.yaml hydra.sweep.subdir): a swept path value (`/`) stays one dir level."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("path_safe", lambda name: str(name).replace("/", "_"), replace=True)


def dirname_overrides(overrides: list[str]) -> list[str]:
    """The Hydra override that names job dirs by the swept keys only (fixed keys and output_dir left out)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    fixed = [o.get_key_element().lstrip("+~") for o in parsed if not o.is_sweep_override()]
    return [f"hydra.job.config.override_dirname.exclude_keys=[{','.join(['output_dir'] + fixed)}]"]


def check_sweep_dir(output_dir: str) -> None:
    """Refuse a sweep whose dir is a single run's dir (the README's old order did this: `rlhf rl`, then
    `rlhf rl -m ...` put every job inside runs/rl)."""
    root = Path(output_dir).expanduser()
    if (root / "metrics.jsonl").exists() or (root / "config.json").exists():
        raise ConfigError(f"output_dir {output_dir} holds a run (not a sweep): the sweep's jobs would land inside it; "
                          f"give the sweep its own dir, e.g. output_dir={output_dir.rstrip('/')}-sweep")


def check_run_dir(output_dir: str) -> None:
    """The other way round: a single run into a sweep's dir would write its metrics.jsonl beside the jobs,
    and `rlhf plot` of that dir would then show the run alone."""
    root = Path(output_dir).expanduser()
    if (root / "multirun.yaml").exists() and not (root / "config.json").exists():
        raise ConfigError(f"output_dir {output_dir} holds a sweep (multirun.yaml and its job dirs); give this run "
                          f"its own dir, e.g. output_dir={output_dir.rstrip('/')}-run, or add -m to rerun the sweep")


def run_job(run, config, output_dir: Path, exit_code_of) -> None:
    """run(config, output_dir) for one sweep job: its result (or its failure, printed at once) recorded,
    never raised, so the sweep goes on. exit_code_of(exc) -> (one-line message, exit code) for a failure
    the CLI knows how to explain (None: an unexpected error, whose traceback is printed)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    excluded = set(hc.job.config.override_dirname.exclude_keys)
    swept = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") not in excluded
             and not o.startswith("hydra.")]
    job = JobResult(int(hc.job.num), swept, output_dir)
    RESULTS.append(job)
    console.print(f"sweep job {job.number} ({' '.join(swept)}) -> {output_dir}", markup=False, soft_wrap=True)
    try:
        metrics = run(config, output_dir) or {}
        job.metrics = {k: v for k, v in metrics.items() if not k.startswith("_")}
    except Exception as e:
        explained = exit_code_of(e)
        if explained is None:
            traceback.print_exc()
            explained = (f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1)
        job.status, job.error, job.exit_code = "failed", explained[0], explained[1]
        console.print(f"sweep job {job.number} ({' '.join(swept)}) failed: {job.error}; the sweep goes on",
                      markup=False, soft_wrap=True)


def final_metrics(metrics: dict) -> dict:
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    order = sorted(numeric, key=lambda k: (not k.startswith("eval_"), k))
    return {k: numeric[k] for k in order[:FINAL_KEYS]}


def report(stage: str) -> int:
    """Print the summary table -> the exit status of the sweep (0 when every job finished)."""
    from rich.markup import escape
    from rich.table import Table

    if not RESULTS:
        return 0
    header = ("job", "overrides", "status", "final metrics")
    rows = [(str(job.number), " ".join(job.overrides), job.status,
             job.error if job.status == "failed" else " ".join(f"{k}={fmt_value(v)}"
                                                              for k, v in final_metrics(job.metrics).items()))
            for job in RESULTS]
    title = f"rlhf {stage} sweep: {len(RESULTS)} jobs"
    if console.is_terminal:
        table = Table(title=title)
        for col in header:
            table.add_column(col)
        for row in rows:
            table.add_row(*(escape(x) for x in row))  # overrides and messages may hold [brackets]
        console.print(table)
    else:  # a log file: tab-separated lines, nothing cut at 80 columns
        print("\n".join([title, "\t".join(header)] + ["\t".join(r) for r in rows]), file=sys.stderr, flush=True)
    failed = [j for j in RESULTS if j.status == "failed"]
    if not failed:
        return 0
    where = "; ".join(f"job {j.number} ({' '.join(j.overrides)}): {j.error}" for j in failed)
    console.print(f"error: {len(failed)} of {len(RESULTS)} sweep jobs failed: {where}", markup=False, soft_wrap=True)
    return 2 if all(j.exit_code == UserError.exit_code for j in failed) else 1

