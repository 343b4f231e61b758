"""The logging layer: metrics.jsonl always, TensorBoard and W&B by config, a rich
progress bar and result tables.

Runners call ``tracker.log(step, metrics)`` with plain dicts; only this module
(and the CLI) touch rich. On a terminal a progress bar; anywhere else (nohup,
SLURM, a pipe) each logged step is one plain line on stdout. Non-main ranks get a tracker that writes nothing.
A metric ``loss`` logged with kind ``train`` is the TensorBoard / W&B scalar
``train/loss``; eval metrics are ``eval/eval_accuracy`` and so on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rlhf_cli.errors import ConfigError

console = Console(stderr=True, highlight=False)


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class TensorBoardSink:
    """<run>/tensorboard/ event files; the resolved config as a text summary.

    On resume (start_step > 0) events after start_step, written by the run that
    was stopped, are purged, as metrics.jsonl drops its lines after the checkpoint.
    """

    def __init__(self, run_dir: Path, stage: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), flush_secs=10,
                                    purge_step=start_step + 1 if start_step else None)
        text = json.dumps(config, indent=2, default=str)
        # markdown: a 4-space indent renders as a code block in TensorBoard's text tab
        self.writer.add_text("config", f"rlhf {stage}\n\n" + "\n".join("    " + line for line in text.splitlines()),
                             global_step=start_step)

    def log(self, step: int, kind: str, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run named after the run dir, with an id derived from its path, so a resumed run continues it."""

    def __init__(self, run_dir: Path, stage: str, config: dict, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.wandb=true but wandb is not installed; pip install wandb, "
                              "or set logging.wandb=false") from None
        root = Path(run_dir).resolve()
        run_id = hashlib.sha1(f"{root}-{stage}".encode()).hexdigest()[:16]
        self.wandb = wandb
        self.run = wandb.init(project=project, name=f"{stage}:{root.name}", id=run_id, resume="allow",
                              dir=str(root), config=config, job_type=stage)

    def log(self, step: int, kind: str, metrics: dict) -> None:
        values = {f"{kind}/{k}": v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def _as_dict(config) -> dict:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    return dict(config)


def _saved_config(run_dir: Path) -> dict:
    """The resolved config RunDir wrote to <run>/config.json ({} when there is none)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


class Tracker:
    def __init__(self, run_dir: Path, stage: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_keys: tuple[str, ...] = ("loss",), config=None):
        """config: the resolved stage config (dataclass or dict); None reads <run_dir>/config.json.
        Its `logging` group turns TensorBoard / W&B on; the whole config is attached to them."""
        self.enabled = enabled
        self.stage = stage
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress_keys = progress_keys
        self.total_steps = total_steps
        self.t0 = time.time()
        self._progress = None
        self._sinks: list = []
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        config = _as_dict(config) if config is not None else _saved_config(run_dir)
        logging_cfg = config.get("logging") or {}
        if logging_cfg.get("tensorboard"):
            self._sinks.append(TensorBoardSink(run_dir, stage, config, start_step))
        if logging_cfg.get("wandb"):
            self._sinks.append(WandbSink(run_dir, stage, config, logging_cfg.get("wandb_project") or "rlhf"))
        # a bar only where both streams are a terminal; anywhere else (nohup, SLURM, `| tee`, a file) every
        # logged step is one plain line on stdout, so a log file holds the training curve
        show = console.is_terminal and sys.stdout.isatty() and not os.environ.get("RLHF_NO_PROGRESS")
        if show:
            self._progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), console=console, transient=False)
            self._task = self._progress.add_task(stage, total=total_steps, completed=start_step, info="")
            self._progress.start()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop metric lines of steps the checkpoint does not contain."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line torn by a kill
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "kind": kind, "time_s": round(time.time() - self.t0, 3),
               **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for sink in self._sinks:
            sink.log(step, kind, {k: row[k] for k in metrics})
        line = f"[{self.stage}] step {step}/{self.total_steps} {kind}: " + _fmt(metrics)
        if self._progress is None:  # not a terminal: every logged step, one plain unwrapped line on stdout
            print(line, flush=True)
        elif kind != "train":
            self._progress.console.print(line, markup=False, soft_wrap=True)
        else:
            info = _fmt({k: metrics[k] for k in self.progress_keys if k in metrics})
            self._progress.update(self._task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text, soft_wrap=not console.is_terminal)  # a log file: one line, not cut at 80

    def table(self, title: str, rows: dict) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows.items():
            table.add_row(escape(k), escape(fmt_value(v)))
        console.print(table)

    def samples(self, title: str, rows: list[tuple[str, str, str]]) -> None:
        if not self.enabled or not rows:
            return
        table = Table(title=title, show_lines=True)
        for col in ("prompt", "response", "check"):
            table.add_column(col)
        for r in rows:
            table.add_row(*[escape(x.strip()) for x in r])  # model text may hold [brackets]
        console.print(table)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def fmt_value(v) -> str:
    v = _clean(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in metrics.items())


class Throughput:
    """Items per second since the previous call (the first: since construction)."""

    def __init__(self):
        self.t = time.perf_counter()

    def rate(self, count: float) -> float:
        now = time.perf_counter()
        rate = count / max(1e-9, now - self.t)
        self.t = now
        return rate
