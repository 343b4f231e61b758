"""`rlhf <stage> [CONFIG.yaml] [key=value ...] [-m]`: a thin dispatcher over Hydra.

    rlhf sft                                   # embedded tiny model + task, CPU minutes
    rlhf sft my_sft.yaml optim.lr=1e-3         # a config file of your own, plus overrides
    rlhf sft -m seed=1,2,3                     # a Hydra multirun sweep (a dir per job)
    rlhf sft --cfg job                         # print the composed config
    rlhf sft --help                            # config groups and keys, with their docs

The dispatcher pops the stage, turns a positional YAML file into overrides,
composes and validates the whole config (every sweep combination) with
Hydra's compose API before anything loads, then hands over to the stage's
own ``@hydra.main`` so Hydra keeps multirun, ``--cfg``, output dirs and tab
completion. A problem the user can fix prints one line and exits 2 (a full
disk included); SIGTERM / SIGINT stop after the current step with a checkpoint,
one line saying how to resume, and exit 143 / 130 (rlhf_cli/signals.py).
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
from pathlib import Path

from rlhf_cli import signals
from rlhf_cli.compose import CONF_DIR, compose_all, config_name, split_args
from rlhf_cli.errors import UserError
from rlhf_cli.tracking import console

EXIT_USAGE = 2
STAGES = {
    "sft": ("rlhf_cli.stages.sft", "supervised fine-tuning on prompt/completion or chat rows"),
    "train-rm": ("rlhf_cli.stages.train_rm", "reward model from prompt/chosen/rejected pairs"),
    "rl": ("rlhf_cli.stages.rl", "REINFORCE, A2C or PPO against reward models and rule rewards"),
}
TOOLS = {  # commands beside the stages: each module has main(args)
    "validate": ("rlhf_cli.validate", "check a stage's config and data files without loading any model"),
    "eval": ("rlhf_cli.evaluate", "held-out accuracy, reward-model score, length and samples of a final/ model"),
    "plot": ("rlhf_cli.plot", "PNG curves (loss, reward, KL, accuracy, length) comparing runs or a sweep"),
}
DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}  # a write failed: one line, exit 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # brackets in messages stay text
    sys.exit(code)


def available_stages() -> dict:
    """Stages whose runner module exists (no stubs are listed)."""
    import importlib.util

    return {k: v for k, v in STAGES.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> None:
    """The `rlhf` entry point. Ctrl-C while no run holds the step-boundary handler (importing torch,
    composing the config, a tool's work) is one line and exit 130, as a stop during training is (signals.py)."""
    signals.exit_at_once_on_sigint()
    dispatch(argv)


def dispatch(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = available_stages()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_stages(stages)
        return
    stage, rest = argv[0], argv[1:]
    if stage in TOOLS:
        run_tool(stage, rest)
        return
    if stage not in stages:
        close = difflib.get_close_matches(stage, list(stages) + list(TOOLS), n=1)
        fail(f"unknown stage {stage!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
             f" (stages: {', '.join(stages)}; tools: {', '.join(TOOLS)})")
    if not CONF_DIR.is_dir():
        fail(f"config directory {CONF_DIR} not found; install with `pip install -e .` from the repo or set RLHF_CONF_DIR")
    if any(a in ("-h", "--help") for a in rest):
        print_stage_help(stage)
        return
    try:  # every problem with the command line or the config: one line, exit 2, before anything loads
        overrides, hydra_args = split_args(rest)
        multirun = any(a in ("-m", "--multirun") for a in hydra_args)
        signals.remember_command(stage, rest)  # for the resume hint after SIGTERM / SIGINT
        configs = compose_all(stage, overrides, multirun)
    except UserError as e:
        fail(str(e), code=e.exit_code)
    if not multirun and os.environ.get("RANK", "0") == "0" and not {"--cfg", "-c", "--info", "-i"} & set(hydra_args):
        check_not_in_use(configs[0].output_dir)
    if multirun:  # name each job's dir by the swept keys only: runs/rl/algorithm=ppo,seed=1
        fixed = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "," not in o.split("=", 1)[-1]
                 and not o.startswith("hydra.")]
        overrides.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(['output_dir'] + fixed)}]")
    if os.environ.get("RANK", "0") != "0":
        overrides.append("hydra.output_subdir=null")  # only rank 0 writes .hydra/
    run_hydra(stage, overrides, hydra_args)


def run_tool(name: str, args: list[str]) -> None:
    import importlib

    try:
        importlib.import_module(TOOLS[name][0]).main(args)
    except UserError as e:
        fail(str(e), code=e.exit_code)


def check_not_in_use(output_dir: str) -> None:
    """Refuse before Hydra writes into a run dir another live run holds (RunDir takes the real lock)."""
    from rlhf_cli.checkpoint import lock_holder

    holder = lock_holder(Path(output_dir).expanduser())
    if holder is not None:
        fail(f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); "
             f"wait for it to finish or stop it, or choose another output_dir=...")


def run_hydra(stage: str, overrides: list[str], hydra_args: list[str]) -> None:
    import importlib

    import hydra

    from rlhf_cli.config import register_configs

    register_configs()
    runner = importlib.import_module(STAGES[stage][0])
    task = hydra.main(config_path=str(CONF_DIR), config_name=config_name(stage), version_base="1.3")(
        _task_function(stage, runner))
    sys.argv = [f"rlhf {stage}"] + hydra_args + overrides
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # let Hydra's own write errors reach the handler below
    try:
        task()
    except Exception as e:  # Hydra writing .hydra/ into a full disk: one line, not a traceback
        fail_if_disk_full(e, output_dir=None)
        if isinstance(e, OSError):  # e.g. hydra.run.dir=/proc/x: Hydra could not make the run directory
            fail(f"could not write the run directory: {e}; choose a writable output_dir=...")
        raise


def _task_function(stage: str, runner):
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            config = OmegaConf.to_object(cfg)
            with signals.stop_at_step_boundary():
                runner.run(config, output_dir)
        except UserError as e:
            fail(str(e), code=e.exit_code)
        except signals.Interrupted as e:  # SIGTERM / SIGINT: checkpoint written; one plain line, 143 / 130
            if os.environ.get("RANK", "0") == "0":
                print(str(e), file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except Exception as e:  # a write that hit a full disk anywhere (metrics, base model, ...): one line
            fail_if_disk_full(e, output_dir)
            raise

    task.__name__ = stage.replace("-", "_")
    return task


def fail_if_disk_full(exc: BaseException, output_dir) -> None:
    """fail() with one line when exc (or what caused it) is a write refused for space: ENOSPC, EFBIG,
    EDQUOT, EROFS, whether raised as OSError or wrapped in another library's error text."""
    e, seen = exc, 0
    while e is not None and seen < 10:
        reason = None
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            reason = f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
        else:
            reason = next((os.strerror(n) for n in DISK_ERRNOS if os.strerror(n) in str(e)), None)
        if reason:
            where = f" in {output_dir}" if output_dir else ""
            fail(f"could not write{where}: {reason} (disk full or over quota?); free space or choose another "
                 f"output_dir=..., then rerun: it resumes from the last complete checkpoint")
        e, seen = e.__cause__ or e.__context__, seen + 1


def print_stages(stages: dict) -> None:
    from rich.table import Table

    console.print("usage: rlhf <stage> [CONFIG.yaml] [key=value ...] [-m]   (rlhf <stage> --help for its keys)",
                  markup=False)
    for kind, commands in (("stage", stages), ("tool", TOOLS)):
        if kind == "tool":
            console.print("tools: rlhf validate <stage> [CONFIG.yaml] [key=value ...] | rlhf eval CHECKPOINT "
                          "[key=value ...] [--json OUT] | rlhf plot RUN_DIR [RUN_DIR ...] [-o OUT.png]   "
                          "(rlhf <tool> --help)", markup=False)
        table = Table(show_header=True)
        table.add_column(kind)
        table.add_column("what it does")
        for name, (_, what) in commands.items():
            table.add_row(name, what)
        console.print(table)


def print_stage_help(stage: str) -> None:
    from rich.table import Table

    from rlhf_cli.config import STAGE_SCHEMAS, field_docs

    console.print(f"usage: rlhf {stage} [CONFIG.yaml] [key=value ...] [-m] [--cfg job]", markup=False)
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    primary = (CONF_DIR / f"{config_name(stage)}.yaml").read_text()
    console.print("config groups (pick with group=option):")
    for g in groups:
        if f"- {g}:" in primary or f"{g}:" in primary.split("_self_")[0]:
            options = sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml"))
            console.print(f"  {g}: {', '.join(options)}")
    table = Table(title=f"keys of `rlhf {stage}` (defaults before the config file and groups apply)")
    for col in ("key", "default", "doc"):
        table.add_column(col)
    for key, default, help_text in field_docs(STAGE_SCHEMAS[stage]):
        table.add_row(key, default, help_text)
    console.print(table)
