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
import itertools
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
CONF_DIR = Path(os.environ.get("RLHF_CONF_DIR", Path(__file__).resolve().parent.parent / "conf"))
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
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                          "--config-name", "-cn", "--config-dir", "-cd", "-sc", "--shell-completion"}


def fail(message: str, code: int = EXIT_USAGE) -> None:
    from rich.markup import escape

    from rlhf_cli.tracking import console

    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # brackets in messages stay text
    sys.exit(code)


def available_stages() -> dict:
    """Stages whose runner module exists (no stubs are listed)."""
    import importlib.util

    return {k: v for k, v in STAGES.items() if importlib.util.find_spec(v[0]) is not None}


def main(argv: list[str] | None = None) -> None:
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
    overrides, hydra_args = split_args(rest)
    multirun = any(a in ("-m", "--multirun") for a in hydra_args)
    from rlhf_cli import signals

    signals.remember_command(stage, rest)  # for the resume hint after SIGTERM / SIGINT
    configs = validate(stage, overrides, multirun)
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

    from rlhf_cli.errors import UserError

    try:
        importlib.import_module(TOOLS[name][0]).main(args)
    except UserError as e:
        fail(str(e), code=e.exit_code)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """-> (overrides, hydra flags); a positional YAML becomes overrides (its keys, flattened)."""
    overrides, hydra_args = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a in HYDRA_FLAGS_WITH_VALUE and i + 1 < len(args):
            hydra_args += [a, args[i + 1]]
            i += 2
            continue
        if a.startswith("-"):
            hydra_args.append(a)
        elif "=" not in a and a.endswith((".yaml", ".yml")):
            overrides.extend(yaml_to_overrides(a))
        elif "=" not in a:
            fail(f"{a!r} is neither key=value nor a .yaml file; write e.g. optim.lr=1e-4")
        else:
            overrides.append(_quote_path_value(a))
        i += 1
    return overrides, hydra_args


def _quote_path_value(override: str) -> str:
    """policy.path=runs/sft/seed=1/final -> policy.path='runs/sft/seed=1/final': a sweep job's dir
    holds '=', which Hydra's override grammar rejects unquoted."""
    key, value = override.split("=", 1)
    if "=" not in value or value[:1] in ("'", '"', "[", "{") or any(c in value for c in ",()'\\"):
        return override
    return f"{key}='{value}'"


def yaml_to_overrides(path: str) -> list[str]:
    """A user's YAML file as Hydra overrides: `algorithm: ppo` picks the group option,
    `optim: {lr: 1e-4}` sets optim.lr. Later command-line overrides win."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        fail(f"config file {path} not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        fail(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        fail(f"config file {path} must hold a mapping of keys (e.g. `optim: {{lr: 1e-4}}`)")
    data.pop("defaults", None)
    out = []

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            full = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(full + ".", value)
            else:
                out.append(f"{full}={_override_value(value)}")

    walk("", data)
    return out


def _override_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_override_value(x)}" for k, x in v.items()) + "}"
    s = str(v).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{s}'"


def _config_name(stage: str) -> str:
    from rlhf_cli.config import STAGE_CONFIG_NAMES

    return STAGE_CONFIG_NAMES[stage]


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every combination of a sweep's values (capped), each as plain overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        fail(f"bad override: {str(e).splitlines()[0]}")
    choices = []
    for raw, o in zip(overrides, parsed):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([raw])
    return [list(c) for c in itertools.islice(itertools.product(*choices), 64)]


def compose_config(stage: str, overrides: list[str]):
    """Compose + validate: -> the typed stage config object. Raises on problems."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from rlhf_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=_config_name(stage), overrides=[o for o in overrides if not o.startswith("hydra.")])
    return OmegaConf.to_object(cfg)


def validate(stage: str, overrides: list[str], multirun: bool) -> list:
    """Compose and check every sweep combination; -> their typed configs (fail() on the first problem)."""
    check_appended_keys(stage, overrides)
    combos = expand_sweeps(overrides) if multirun else [overrides]
    configs = []
    for combo in combos:
        try:
            cfg = compose_config(stage, combo)
        except Exception as e:  # one line, named key, closest valid key
            fail(explain_config_error(stage, e, combo))
        check_output_dir(cfg.output_dir)
        configs.append(cfg)
    return configs


def check_not_in_use(output_dir: str) -> None:
    """Refuse before Hydra writes into a run dir another live run holds (RunDir takes the real lock)."""
    from rlhf_cli.checkpoint import lock_holder

    holder = lock_holder(Path(output_dir).expanduser())
    if holder is not None:
        fail(f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}); "
             f"wait for it to finish or stop it, or choose another output_dir=...")


def check_output_dir(output_dir: str) -> None:
    """Hydra creates the run dir before the stage runs: make sure it can."""
    p = Path(output_dir).expanduser().absolute()
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"output_dir {output_dir} is not writable ({existing} is "
             f"{'not a directory' if not existing.is_dir() else 'read-only'}); choose another output_dir=...")


def explain_config_error(stage: str, exc: Exception, overrides: list[str]) -> str:
    from rlhf_cli.config import STAGE_SCHEMAS, leaf_keys
    from rlhf_cli.errors import UserError

    if isinstance(exc, UserError):
        return str(exc)
    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, UserError):
            return str(err)
    text = " ".join(str(c) for c in chain)
    keys = leaf_keys(STAGE_SCHEMAS[stage])
    full_key = next((getattr(c, "full_key", None) for c in chain if getattr(c, "full_key", None)), None)
    if "not in" in text or "Could not override" in text or "Key '" in text and "not in" in text:
        bad = full_key or _override_key_in(text, overrides)
        if bad:
            return unknown_key_message(stage, bad, keys)
    if "Could not find" in text or "Could not load" in text:
        first = str(chain[0]).splitlines()
        at = next((i for i, line in enumerate(first) if "Available options" in line), None)
        if at is None:
            return first[0]
        names = []  # the options are the tab-indented lines under "Available options in 'group':"
        for line in first[at + 1:]:
            if not line.startswith("\t"):
                break
            names.append(line.strip())
        return f"{first[0]}; {first[at].strip()} {', '.join(names)}"
    for c in chain:
        if full_key and c.__class__.__name__ in ("ValidationError", "ConfigTypeError", "ConfigValueError"):
            msg = str(getattr(c, "msg", c)).splitlines()[0]
            return f"{full_key}: {msg}; see `rlhf {stage} --help` for its type"
    return str(chain[0]).splitlines()[0]


def unknown_key_message(stage: str, bad: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else f"; see `rlhf {stage} --help` for the keys"
    return f"unknown config key {bad!r}{hint}"


def check_appended_keys(stage: str, overrides: list[str]) -> None:
    """`+key=value` adds a key Hydra would otherwise refuse; the schema has no room for it (the run
    would silently ignore it), so only keys the schema knows may be appended."""
    from rlhf_cli.config import STAGE_SCHEMAS, leaf_keys

    keys = leaf_keys(STAGE_SCHEMAS[stage])
    for o in overrides:
        key = o.lstrip("+").split("=", 1)[0]
        if o.startswith("+") and not key.startswith("hydra.") and key not in keys \
                and not any(k.startswith(key + ".") for k in keys):
            fail(unknown_key_message(stage, key, keys))


def _override_key_in(text: str, overrides: list[str]) -> str | None:
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in text:
            return key
    return None


def run_hydra(stage: str, overrides: list[str], hydra_args: list[str]) -> None:
    import importlib

    import hydra

    from rlhf_cli.config import register_configs

    register_configs()
    runner = importlib.import_module(STAGES[stage][0])
    task = hydra.main(config_path=str(CONF_DIR), config_name=_config_name(stage), version_base="1.3")(
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

        from rlhf_cli import signals
        from rlhf_cli.errors import UserError

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

    from rlhf_cli.tracking import console

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
    from rlhf_cli.tracking import console

    console.print(f"usage: rlhf {stage} [CONFIG.yaml] [key=value ...] [-m] [--cfg job]", markup=False)
    groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())
    primary = (CONF_DIR / f"{_config_name(stage)}.yaml").read_text()
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
