"""From the command line to a typed, checked stage config: Hydra's compose API, before anything loads.

    overrides, hydra_args = split_args(["my.yaml", "optim.lr=1e-4", "-m"])
    configs = compose_all("rl", overrides, multirun=True)     # every sweep combination, checked

Used by the dispatcher (cli.py) and by `rlhf validate`. Every problem is a
ConfigError (one line, exit 2): an unknown key names the closest valid one, a
bad value names its key, a missing group option lists the options. A key set
that the chosen options do not read (config.READ_WHEN) is a `warning:` line.
"""

from __future__ import annotations

import difflib
import itertools
import os
from pathlib import Path

from rlhf_cli.errors import ConfigError, UserError
from rlhf_cli.training.tracking import console

# hydra, omegaconf and rlhf_cli.config (which imports hydra) load inside the functions that compose:
# `rlhf --help` and `rlhf <stage> --help` print without them.
CONF_DIR = Path(os.environ.get("RLHF_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))  # the repo's conf/

HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                          "--config-name", "-cn", "--config-dir", "-cd", "-sc", "--shell-completion"}


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
            raise ConfigError(f"{a!r} is neither key=value nor a .yaml file; write e.g. optim.lr=1e-4")
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
        raise ConfigError(f"config file {path} not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys (e.g. `optim: {{lr: 1e-4}}`)")
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


def config_name(stage: str) -> str:
    from rlhf_cli.config import STAGE_CONFIG_NAMES

    return STAGE_CONFIG_NAMES[stage]


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every combination of a sweep's values (capped), each as plain overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}")
    choices = []
    for raw, o in zip(overrides, parsed):
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([raw])
    return [list(c) for c in itertools.islice(itertools.product(*choices), 64)]


def _compose(stage: str, overrides: list[str], return_hydra_config: bool = False):
    """Hydra's compose API on the stage's primary config -> the DictConfig (what `--cfg job` prints)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name(stage), return_hydra_config=return_hydra_config,
                       overrides=[o for o in overrides if not o.startswith("hydra.")])


def compose_config(stage: str, overrides: list[str]):
    """Compose + validate: -> the typed stage config object. Raises on problems."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(_compose(stage, overrides))


def compose_for_help(stage: str, overrides: list[str]) -> tuple[dict, dict]:
    """-> (the composed config as plain containers, exactly what `--cfg job` prints; the chosen option of
    each config group). No __post_init__ checks run: help shows the composed values even for a config that
    a run would refuse (a ConfigError only for keys or values the composition itself rejects)."""
    from omegaconf import OmegaConf

    try:
        cfg = _compose(stage, overrides, return_hydra_config=True)
    except Exception as e:
        raise ConfigError(explain_config_error(stage, e, overrides)) from None
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra/")}
    job = OmegaConf.to_container(cfg, resolve=False)
    job.pop("hydra")
    return job, choices


def compose_all(stage: str, overrides: list[str], multirun: bool) -> list:
    """Compose and check every sweep combination; -> their typed configs (ConfigError on the first problem)."""
    from rlhf_cli.config import ignored_keys

    check_appended_keys(stage, overrides)
    combos = expand_sweeps(overrides) if multirun else [overrides]
    configs, warnings = [], []
    for combo in combos:
        try:
            cfg = compose_config(stage, combo)
        except Exception as e:  # one line, named key, closest valid key
            raise ConfigError(explain_config_error(stage, e, combo)) from None
        check_output_dir(cfg.output_dir)
        configs.append(cfg)
        warnings += [w for w in ignored_keys(stage, cfg, combo) if w not in warnings]
    warn(warnings)
    return configs


def warn(lines: list[str]) -> None:
    """`warning: ...` lines on stderr (rank 0 only): what the run will do differently from what was asked."""
    if lines and os.environ.get("RANK", "0") == "0":
        for line in lines:
            console.print(f"warning: {line}", markup=False, soft_wrap=True)


def check_output_dir(output_dir: str) -> None:
    """Hydra creates the run dir before the stage runs: make sure it can."""
    p = Path(output_dir).expanduser().absolute()
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {output_dir} is not writable ({existing} is "
             f"{'not a directory' if not existing.is_dir() else 'read-only'}); choose another output_dir=...")


def explain_config_error(stage: str, exc: Exception, overrides: list[str]) -> str:
    """One line for a composition failure, chosen by the exception types in its chain (not Hydra's wording)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (ConfigAttributeError, ConfigKeyError, ConfigTypeError, ConfigValueError,
                                  ValidationError)

    from rlhf_cli.config import STAGE_SCHEMAS, leaf_keys

    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full_key = next((getattr(c, "full_key", None) for c in chain if getattr(c, "full_key", None)), None)
    for err in chain:
        if isinstance(err, UserError):  # our own checks (__post_init__) already say it in one line
            return str(err)
        if isinstance(err, MissingConfigException):  # group=option naming no file: list the options
            group = (err.missing_cfg_file or "").rsplit("/", 1)[0]
            options = f"; Available options in '{group}': {', '.join(err.options)}" if err.options else ""
            return str(err).splitlines()[0] + options
        if isinstance(err, (ConfigKeyError, ConfigAttributeError)):  # an unknown key
            bad = full_key or _override_key_in(" ".join(str(c) for c in chain), overrides)
            if bad:
                return unknown_key_message(stage, bad, leaf_keys(STAGE_SCHEMAS[stage]))
        if full_key and isinstance(err, (ValidationError, ConfigTypeError, ConfigValueError)):
            msg = str(getattr(err, "msg", err)).splitlines()[0]
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
            raise ConfigError(unknown_key_message(stage, key, keys))


def _override_key_in(text: str, overrides: list[str]) -> str | None:
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if f"'{key}'" in text:
            return key
    return None
