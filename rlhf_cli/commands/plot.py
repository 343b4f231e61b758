"""`rlhf plot RUN_DIR [RUN_DIR ...] [-o OUT.png] [--keys k1,k2]`: curves comparing runs.

    rlhf plot runs/sft runs/rm runs/rl                   # -> curves.png
    rlhf rl -m algorithm=reinforce,a2c,ppo output_dir=runs/algos
    rlhf plot runs/algos -o algos.png                    # a sweep dir: one line per job
    rlhf plot runs/algos --keys kl,eval_accuracy         # only these metrics

Reads each run's metrics.jsonl and draws one panel per stage and metric, so
one stage's numbers never share a panel with another's (sft's next-token loss,
train-rm's Bradley-Terry loss and rl's policy loss are three panels; sft's
held-out generation accuracy and train-rm's pairwise accuracy two). Panels are
titled `stage: metric` with the metric's meaning as the y label, grouped by
stage (sft, train-rm, rl), then in this order: losses, rewards and scores, KL,
accuracies, lengths (`--keys` picks others, e.g. lr or grad_norm). Each run is
one line, in the same colour in every panel. A run's stage is read from its
config.json. A directory without metrics.jsonl whose subdirectories have one
(a Hydra multirun sweep) stands for all of them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from rlhf_cli.commands import helptext
from rlhf_cli.errors import UserError
from rlhf_cli.training.tracking import console

# (family, pattern) in panel order; a key joins the first family it matches
FAMILIES = [("loss", r"loss$"), ("reward", r"(score|reward)"), ("KL", r"(^|_)kl$"),
            ("accuracy", r"(accuracy|pass@\d+|maj@\d+)$"), ("length", r"(_len|_chars|_tokens)$")]
SKIP = re.compile(r"^(first_mb_|time_)")
MAX_PANELS = 24
STAGE_ORDER = ("sft", "train-rm", "dpo", "rl")
# the y label of a (stage, metric) panel where the bare name would mislead
MEANINGS = {
    ("sft", "loss"): "next-token cross-entropy (completion tokens)",
    ("sft", "eval_loss"): "held-out next-token cross-entropy",
    ("sft", "eval_accuracy"): "held-out generation accuracy (eval.rule)",
    ("dpo", "loss"): "preference loss (+ sft_weight x chosen NLL)",
    ("dpo", "eval_loss"): "held-out preference loss",
    ("dpo", "pair_accuracy"): "pairs ranked right by the implicit reward (train batch)",
    ("dpo", "eval_pair_accuracy"): "held-out pairs ranked right by the implicit reward",
    ("dpo", "eval_margin"): "held-out reward margin (chosen - rejected)",
    ("dpo", "eval_accuracy"): "held-out generation accuracy (eval.rule)",
    ("train-rm", "loss"): "Bradley-Terry pairwise loss + centering",
    ("train-rm", "bt_loss"): "Bradley-Terry pairwise loss",
    ("train-rm", "eval_loss"): "held-out Bradley-Terry loss",
    ("train-rm", "accuracy"): "pairwise accuracy (train batch)",
    ("train-rm", "eval_accuracy"): "held-out pairwise accuracy",
    ("rl", "loss"): "total loss: policy - entropy + KL + value",
    ("rl", "eval_accuracy"): "held-out generation accuracy (eval.rule)",
}
USAGE = "usage: rlhf plot RUN_DIR [RUN_DIR ...] [-o OUT.png] [--keys k1,k2]"


def parse_args(args: list[str]) -> tuple[list[str], str, list[str] | None]:
    dirs, out, keys = [], "curves.png", None
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-o", "--output", "--keys", "-k"):
            if i + 1 >= len(args):
                raise UserError(f"{a} needs a value; {USAGE}")
            if a in ("-o", "--output"):
                out = args[i + 1]
            else:
                keys = [k.strip() for k in args[i + 1].split(",") if k.strip()]
            i += 2
            continue
        if a.startswith("-"):
            raise UserError(f"unknown flag {a}; {USAGE}")
        dirs.append(a)
        i += 1
    if not dirs:
        raise UserError(f"no RUN_DIR given; {USAGE} (e.g. rlhf plot runs/rl)")
    return dirs, out, keys


def find_runs(specs: list[str]) -> list[tuple[str, Path]]:
    """RUN_DIRs (or sweep dirs) -> (label, metrics.jsonl path) per run."""
    runs = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():
            raise UserError(f"run dir {spec} does not exist; give a run's output_dir (e.g. runs/rl) or a sweep dir")
        if not path.is_dir():
            raise UserError(f"{spec} is not a directory; give a run's output_dir (e.g. runs/rl) or a sweep dir")
        if (path / "metrics.jsonl").is_file():
            runs.append((spec.rstrip("/"), path / "metrics.jsonl"))
            continue
        jobs = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file())
        if not jobs:
            raise UserError(f"no metrics.jsonl in {spec} nor in its subdirectories; is it a run's output_dir?")
        runs.extend((job.name if len(specs) == 1 else f"{spec.rstrip('/')}/{job.name}", job / "metrics.jsonl")
                    for job in jobs)
    return runs


def stage_of(run_dir: Path) -> str:
    """The stage that wrote a run dir: the one whose schema has exactly the top-level keys of its
    config.json ('run' when there is none to read)."""
    import dataclasses

    from rlhf_cli.config import STAGE_SCHEMAS

    try:
        keys = set(json.loads((run_dir / "config.json").read_text()))
    except (OSError, ValueError, TypeError):
        return "run"
    for stage, schema in STAGE_SCHEMAS.items():
        if keys == {f.name for f in dataclasses.fields(schema)}:
            return stage
    return "run"


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) < 1e300


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values); eval rows keep their eval_ names, so train and eval never mix.
    A resumed run can log a step twice: the later line wins."""
    by_key: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("step", "kind", "time_s") or not _is_number(value):
                continue
            name = key if row.get("kind", "train") == "train" or key.startswith(row["kind"]) else f"{row['kind']}_{key}"
            by_key.setdefault(name, {})[int(row["step"])] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_key.items()}


def choose_panels(logged: dict[str, set[str]], wanted: list[str] | None) -> list[tuple[str, str]]:
    """logged: stage -> the keys its runs logged -> (stage, key) panels: stages apart, in STAGE_ORDER,
    each stage's keys in FAMILIES order (or the wanted keys that stage logged)."""
    stages = sorted(logged, key=lambda st: STAGE_ORDER.index(st) if st in STAGE_ORDER else len(STAGE_ORDER))
    if wanted:
        missing = [k for k in wanted if not any(k in keys for keys in logged.values())]
        if missing:
            every = sorted(set().union(*logged.values()))
            raise UserError(f"no run logged {', '.join(missing)}; logged keys: {', '.join(every)}")
        return [(st, k) for st in stages for k in wanted if k in logged[st]]
    panels = []
    for st in stages:
        chosen = []
        for _, pattern in FAMILIES:
            found = [k for k in logged[st] if re.search(pattern, k) and not SKIP.search(k) and k not in chosen]
            chosen += sorted(found, key=lambda k: (k.startswith("eval_"), k))  # train curves first
        panels += [(st, k) for k in chosen]
    return panels[:MAX_PANELS]


def build_figure(runs: list[tuple[str, Path]], wanted: list[str] | None = None):
    """-> (the matplotlib figure, its (stage, key) panels): one axis per panel, titled `stage: key`,
    holding one line per run of that stage (labelled with the run)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    data = [(label, stage_of(path.parent), series(read_metrics(path))) for label, path in runs]
    empty = [label for label, _, s in data if not s]
    if len(empty) == len(data):
        raise UserError(f"no metrics to plot: metrics.jsonl of {', '.join(empty)} has no numeric rows yet")
    logged: dict[str, set[str]] = {}
    for _, stage, s in data:
        logged.setdefault(stage, set()).update(s)
    panels = choose_panels(logged, wanted)
    if not panels:
        raise UserError("none of the runs logged loss, reward, KL, accuracy or length metrics; pick some with --keys")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (stage, key) in zip(axes.flat, panels):
        for r, (label, run_stage, s) in enumerate(data):
            if run_stage == stage and key in s:
                steps, values = s[key]
                ax.plot(steps, values, label=label, color=colours[r % len(colours)],
                        marker="o" if len(steps) < 20 else None, markersize=3)
        ax.set_title(f"{stage}: {key}")
        ax.set_ylabel(MEANINGS.get((stage, key), key), fontsize=8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    by_label = {}  # every run once, from whichever panel it appears in (stages log different metrics)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    labels, handles = list(by_label), list(by_label.values())
    if len(data) > 1 or len(panels) == 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(data)), frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(data) / 4), 1, 1))
    else:
        fig.suptitle(data[0][0])
        fig.tight_layout()
    return fig, panels


def plot(runs: list[tuple[str, Path]], out: Path, wanted: list[str] | None = None) -> list[str]:
    """Draw the panels and write the figure -> the panels drawn, as `stage: key`."""
    import matplotlib.pyplot as plt

    fig, panels = build_figure(runs, wanted)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=100)
    except ValueError as e:  # an unknown extension
        raise UserError(f"-o {out}: {str(e).splitlines()[0]}; write e.g. -o curves.png") from None
    finally:
        plt.close(fig)
    return [f"{stage}: {key}" for stage, key in panels]


def main(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        helptext.print_text(__doc__.strip())
        return
    dirs, out, wanted = parse_args(args)
    runs = find_runs(dirs)
    keys = plot(runs, Path(out).expanduser(), wanted)
    console.print(f"wrote {out}: {len(runs)} run(s) ({', '.join(label for label, _ in runs)}); "
                  f"panels: {', '.join(keys)}", soft_wrap=True, markup=False)
