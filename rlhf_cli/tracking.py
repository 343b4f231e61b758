"""The logging layer: metrics.jsonl always, a rich progress bar and result tables.

Runners call ``tracker.log(step, metrics)`` with plain dicts; only this module
(and the CLI) touch rich. Non-main ranks get a tracker that writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False)


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class Tracker:
    def __init__(self, run_dir: Path, stage: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress_keys: tuple[str, ...] = ("loss",)):
        self.enabled = enabled
        self.stage = stage
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress_keys = progress_keys
        self.t0 = time.time()
        self._progress = None
        if not enabled:
            return
        self._truncate_after(start_step)
        self._file = open(self.path, "a")
        show = console.is_terminal and not os.environ.get("RLHF_NO_PROGRESS")
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
        if kind != "train" or self._progress is None:
            if self._progress is None and kind != "train":
                console.print(f"[{self.stage}] step {step} {kind}: " + _fmt(metrics))
            elif self._progress is None and step % 50 == 0:
                console.print(f"[{self.stage}] step {step}: " + _fmt({k: metrics[k] for k in self.progress_keys if k in metrics}))
            return
        info = _fmt({k: metrics[k] for k in self.progress_keys if k in metrics})
        self._progress.update(self._task, completed=step, info=info)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text)

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
            table.add_row(k, _fmt_value(v))
        console.print(table)

    def samples(self, title: str, rows: list[tuple[str, str, str]]) -> None:
        if not self.enabled or not rows:
            return
        table = Table(title=title, show_lines=True)
        for col in ("prompt", "response", "check"):
            table.add_column(col)
        for r in rows:
            table.add_row(*[x.strip() for x in r])
        console.print(table)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        self._file.close()


def _fmt_value(v) -> str:
    v = _clean(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={_fmt_value(v)}" for k, v in metrics.items())
