"""`rlhf <stage> [CONFIG.yaml] [key=value ...] [-m]`: a thin dispatcher over Hydra.

    rlhf sft                                   # embedded tiny model + task, CPU minutes
    rlhf sft my_sft.yaml optim.lr=1e-3         # a config file of your own, plus overrides
    rlhf sft -m seed=1,2,3 output_dir=runs/seeds   # a Hydra multirun sweep: runs/seeds/seed-1 ... (sweep.py)
    rlhf sft --cfg job                         # print the composed config
    rlhf rl algorithm=ppo --help               # keys with the defaults these options give, on stdout
    rlhf --version; eval "$(rlhf completion bash)"

The dispatcher pops the stage, turns a positional YAML file into overrides,
composes and validates the whole config (every sweep combination) with
Hydra's compose API before anything loads, then hands over to the stage's
own ``@hydra.main`` so Hydra keeps multirun, ``--cfg``, output dirs and tab
completion. A problem the user can fix prints one line and exits 2 (a full
disk included); SIGTERM / SIGINT stop after the current step with a checkpoint,
one line saying how to resume, and exit 143 / 130 (rlhf_cli/training/signals.py).
"""

from __future__ import annotations

import difflib
import errno
import os
import sys
from pathlib import Path

from rlhf_cli import __version__
from rlhf_cli.commands import completion, helptext, sweep
from rlhf_cli.commands.compose import CONF_DIR, compose_all, compose_for_help, config_name, expand_sweeps, split_args
from rlhf_cli.errors import UserError
from rlhf_cli.training import signals
from rlhf_cli.training.tracking import console

EXIT_USAGE = 2
STAGES = {
    "sft": ("rlhf_cli.stages.sft", "supervised fine-tuning on prompt/completion or chat rows"),
    "train-rm": ("rlhf_cli.stages.train_rm", "reward model from prompt/chosen/rejected pairs"),
    "dpo": ("rlhf_cli.stages.dpo", "direct preference optimisation of a policy from the pairs (DPO, IPO, SimPO)"),
    "rl": ("rlhf_cli.stages.rl", "REINFORCE, A2C or PPO against reward models and rule rewards"),
}
TOOLS = {  # commands beside the stages: each module has main(args)
    "validate": ("rlhf_cli.commands.validate", "check a stage's config and data files without loading any model"),
    "eval": ("rlhf_cli.commands.evaluate", "held-out accuracy, reward-model score, length and samples of a final/ model"),
    "plot": ("rlhf_cli.commands.plot", "PNG curves (loss, reward, KL, accuracy, length) comparing runs or a sweep"),
    "generate": ("rlhf_cli.commands.generate", "K sampled responses per prompt from a policy, resumable (docs/loop.md)"),
    "label": ("rlhf_cli.commands.label", "preference pairs from generations, judged by rules, a reward model or people"),
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
    # OpenMP threads that sleep while they wait instead of spinning, unless the user chose: set before torch
    # loads libgomp. On a shared CPU, spinning threads collapse (scripts/bench_threads.py: a tiny sft 379 s with
    # torch's default vs 25 s passive; quiet it costs 21%: docs/benchmarks.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signals.exit_at_once_on_sigint()
    try:
        dispatch(argv)
    except SystemExit as e:
        exit_after_gloo(e.code)
        raise
    exit_after_gloo(0)


def exit_after_gloo(code) -> None:
    """After a run under torchrun on CPU, end the process at once (why: runtime.exit_process); torch is
    not imported for this where no run imported it (a config error, --help)."""
    runtime = sys.modules.get("rlhf_cli.training.runtime")
    if runtime is not None:
        runtime.exit_process(code)


def dispatch(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    stages = available_stages()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_stages(stages)
        return
    if argv[0] in ("completion", "__complete"):  # bash tab completion (rlhf_cli/commands/completion.py)
        args = argv[1:] if argv[0] == "completion" else argv
        try:
            completion.main(args, list(stages) + list(TOOLS))
        except UserError as e:
            fail(str(e), code=e.exit_code)
        return
    if argv[0] in ("-V", "--version"):
        print(f"rlhf {__version__}")
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
    try:  # every problem with the command line or the config: one line, exit 2, before anything loads
        if any(a in ("-h", "--help") for a in rest):
            print_stage_help(stage, rest)
            return
        if any(a in ("-sc", "--shell-completion") for a in rest):  # Hydra's would parse the stage as an override
            raise UserError('Hydra\'s --shell-completion does not know the stage word; use rlhf\'s own: '
                            'eval "$(rlhf completion bash)"')
        overrides, hydra_args = split_args(rest)
        multirun = any(a in ("-m", "--multirun") for a in hydra_args)
        signals.remember_command(stage, rest)  # for the resume hint after SIGTERM / SIGINT
        configs = compose_all(stage, overrides, multirun)
    except UserError as e:
        fail(str(e), code=e.exit_code)
    if not multirun and os.environ.get("RANK", "0") == "0" and not {"--cfg", "-c", "--info", "-i"} & set(hydra_args):
        check_not_in_use(configs[0].output_dir)
        try:
            sweep.check_run_dir(configs[0].output_dir)
        except UserError as e:
            fail(str(e), code=e.exit_code)
    if multirun:  # each job's dir named by the swept keys only: runs/algos/algorithm-ppo+seed-1 (sweep.py)
        try:
            sweep.check_sweep_dir(configs[0].output_dir)
        except UserError as e:
            fail(str(e), code=e.exit_code)
        overrides += sweep.dirname_overrides(overrides)
    overrides.append("hydra.output_subdir=null")  # .hydra/ is written by the job once its run is accepted
    run_hydra(stage, overrides, hydra_args)


def run_tool(name: str, args: list[str]) -> None:
    import importlib

    try:
        importlib.import_module(TOOLS[name][0]).main(args)
    except UserError as e:
        fail(str(e), code=e.exit_code)


def check_not_in_use(output_dir: str) -> None:
    """Refuse before Hydra writes into a run dir another live run holds (RunDir takes the real lock)."""
    from rlhf_cli.training.checkpoint import lock_holder

    holder = lock_holder(Path(output_dir).expanduser())
    if holder is not None:
        fail(f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); "
             f"wait for it to finish or stop it, or choose another output_dir=...")


def accept_run(cfg, config, output_dir: Path) -> None:
    """Rank 0 of a job (a plain run or one of a sweep), before anything is written into its run dir:
    refuse a live run's dir or a rerun that changes more than safe-to-change keys (RunDir checks again
    under the run's lock), then write Hydra's .hydra/ files (hydra.output_subdir is null for that)."""
    import dataclasses

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from rlhf_cli.training.checkpoint import rerun_changes

    check_not_in_use(str(output_dir))
    rerun_changes(output_dir, dataclasses.asdict(config))  # UserError: refused, nothing written
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get())})
    hydra_cfg.hydra.output_subdir = ".hydra"
    saved = output_dir / ".hydra"
    saved.mkdir(parents=True, exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg), ("overrides.yaml", HydraConfig.get().overrides.task)):
        (saved / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def run_hydra(stage: str, overrides: list[str], hydra_args: list[str]) -> None:
    import importlib

    import hydra

    from rlhf_cli.config import register_configs

    register_configs()
    sweep.register_resolvers()
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
    code = sweep.report(stage)  # a multirun: the summary table; non-zero when a job failed
    if code:
        sys.exit(code)


def _task_function(stage: str, runner):
    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            config = OmegaConf.to_object(cfg)

            def run(config, output_dir):
                if os.environ.get("RANK", "0") == "0":
                    accept_run(cfg, config, output_dir)  # a refused rerun writes nothing, .hydra/ included
                return runner.run(config, output_dir)

            with signals.stop_at_step_boundary():
                if HydraConfig.get().mode == RunMode.MULTIRUN:  # a failed job is reported; the sweep goes on
                    sweep.run_job(run, config, output_dir, explain_failure)
                else:
                    run(config, output_dir)
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


def explain_failure(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for a failure the CLI explains (a UserError, a full disk); None otherwise."""
    if isinstance(exc, UserError):
        return str(exc), exc.exit_code
    reason = disk_full_reason(exc)
    return (f"could not write: {reason} (disk full or over quota?)", EXIT_USAGE) if reason else None


def disk_full_reason(exc: BaseException) -> str | None:
    """The reason when exc (or what caused it) is a write refused for space: ENOSPC, EFBIG, EDQUOT, EROFS,
    raised as OSError or wrapped in another library's error text."""
    e, seen = exc, 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
        reason = next((os.strerror(n) for n in DISK_ERRNOS if os.strerror(n) in str(e)), None)
        if reason:
            return reason
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def fail_if_disk_full(exc: BaseException, output_dir) -> None:
    """fail() with one line when exc is a write refused for space (disk_full_reason)."""
    reason = disk_full_reason(exc)
    if reason:
        where = f" in {output_dir}" if output_dir else ""
        fail(f"could not write{where}: {reason} (disk full or over quota?); free space or choose another "
             f"output_dir=..., then rerun: it resumes from the last complete checkpoint")


def print_stages(stages: dict) -> None:
    """`rlhf --help`, on stdout: one `name  what it does` line per stage and per tool."""
    helptext.print_text(f"rlhf {__version__}\n"
                        "usage: rlhf <stage> [CONFIG.yaml] [key=value ...] [-m]   (rlhf <stage> --help for its keys)\n"
                        "tools: rlhf validate <stage> [CONFIG.yaml] [key=value ...] | rlhf eval CHECKPOINT "
                        "[key=value ...] [--json OUT] | rlhf plot RUN_DIR [RUN_DIR ...] [-o OUT.png] | "
                        "rlhf generate model.path=CKPT output=gens.jsonl [key=value ...] | rlhf label input=gens.jsonl "
                        "judge=rule|rm|human output=prefs.jsonl [key=value ...]   (rlhf <tool> --help)\n"
                        "other: rlhf --version | rlhf completion bash (tab completion, docs/config-and-cli.md)")
    width = max(len(n) for n in [*stages, *TOOLS])
    for kind, commands in (("stages", stages), ("tools", TOOLS)):
        lines = [f"  {name:<{width}}  {what}" for name, (_, what) in commands.items()]
        helptext.print_text(f"{kind}:\n" + "\n".join(lines))


def print_stage_help(stage: str, args: list[str]) -> None:
    """The stage's keys with the defaults of the config composed from args (`algorithm=ppo --help` shows
    PPO's), each with its doc, on stdout (rlhf_cli/commands/helptext.py)."""
    from rlhf_cli.config import STAGE_SCHEMAS, field_docs

    overrides, _ = split_args([a for a in args if a not in ("-h", "--help")])
    if len(expand_sweeps(overrides)) > 1:
        raise UserError(f"--help shows one composition; give one value per key, e.g. rlhf {stage} algorithm=ppo --help")
    job, choices = compose_for_help(stage, overrides)
    helptext.print_text(f"usage: rlhf {stage} [CONFIG.yaml] [key=value ...] [-m] [--cfg job]\n"
                        f"config groups (pick with group=option; [chosen]):")
    for group, chosen in sorted(choices.items()):
        if group.endswith("_schema") or chosen is None:
            continue
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        helptext.print_text(f"  {group}: " + ", ".join(f"[{o}]" if o == chosen else o for o in options))
    rows = [(key, helptext.render(_select(job, key)), doc) for key, _, doc in field_docs(STAGE_SCHEMAS[stage])]
    chosen = " ".join(f"{g}={c}" for g, c in sorted(choices.items()) if c and not g.endswith("_schema"))
    helptext.print_keys(f"keys of `rlhf {stage}` ({chosen}{' ' if overrides else ''}{' '.join(overrides)})", rows)


def _select(node: dict, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node
