"""`rlhf validate <stage> [CONFIG.yaml] [key=value ...] [-m]`: check a run before it runs.

    rlhf validate sft                                          # the embedded default
    rlhf validate sft my_sft.yaml data.train=train.jsonl       # your config file, data and overrides
    rlhf validate rl -m algorithm=reinforce,ppo policy.path=runs/sft/final

Composes and checks the config exactly as `rlhf <stage>` does (unknown keys,
types, ranges, cross-field checks, every sweep combination), then reads the
data and checks every row the way the stage will: the columns it needs and
their types (file lines named), chat rows rendered through the tokenizer's chat
template, rows that model.max_length truncates or drops, a batch larger than
the data. Model directories are checked to exist, hold a config.json and be of
the kind their key needs (from its architectures), and reward functions /
eval.rule (and an engine class named by dotted path) to import; no weights load.
Prints an `ok` summary, or one `error:` line and exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_cli.commands import helptext, sweep
from rlhf_cli.commands import compose
from rlhf_cli.envs import env_class
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.rewards import import_reward_function
from rlhf_cli.training.tracking import console

# The modules that import torch (data, models, lora, checkpoint, embedded) and hydra (config) load inside
# the functions that need them: `rlhf validate --help` and a bad stage name answer at once.


class _StructureOnly:
    """Stands in for a hub model's tokenizer (not fetched here): renders chat rows plainly, so
    their structure is checked; the real chat template is applied when the stage runs."""

    chat_template = "structure only"
    eos_token_id = 0
    bos_token_id = None

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def main(args: list[str]) -> None:
    from rlhf_cli.config import STAGE_SCHEMAS

    if not args or args[0] in ("-h", "--help"):
        helptext.print_text(__doc__.strip())
        return
    stage, rest = args[0], args[1:]
    stages = list(STAGE_SCHEMAS)
    if stage not in stages:
        import difflib

        close = difflib.get_close_matches(stage, list(stages), n=1)
        raise UserError(f"rlhf validate: unknown stage {stage!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" (stages: {', '.join(stages)})")
    overrides, flags = compose.split_args(rest)
    multirun = any(a in ("-m", "--multirun") for a in flags)
    other = [a for a in flags if a not in ("-m", "--multirun")]
    if other:
        raise UserError(f"rlhf validate takes a stage, an optional CONFIG.yaml, key=value overrides and -m; "
                        f"not {' '.join(other)}")
    configs = compose.compose_all(stage, overrides, multirun)  # ConfigError: one line on a config problem
    seen: dict[str, list[str]] = {}
    lines = []
    for cfg in configs:
        for line in check_run(stage, cfg, seen):
            if line not in lines:
                lines.append(line)
    if not multirun:
        lines.append(output_dir_state(cfg))
    else:  # as `rlhf <stage> -m` refuses it: a sweep inside a single run's dir
        sweep.check_sweep_dir(configs[0].output_dir)

    what = f"{len(configs)} sweep combinations" if multirun else "config"
    console.print(f"ok: rlhf {stage} {what}, data and model paths check out")
    for line in lines:
        console.print("  " + line, soft_wrap=True, markup=False)


def check_run(stage: str, cfg, cache: dict) -> list[str]:
    """Model paths, reward functions, eval rule and data of one composed config -> summary lines."""
    from rlhf_cli.models import lora
    from rlhf_cli.models import check_models, configured_models

    model_cfg, model_key = cfg.trained_model, f"{cfg.model_key}.path"
    check_models(stage, cfg)  # exists, not a run dir, the kind its key needs (from config.json, no weights)
    lines = []
    for key, path, _ in configured_models(stage, cfg):
        if lora.is_adapter_dir(path):  # a LoRA final/: its base model must be there too
            lines.append(f"{key}: {path} (LoRA adapter over {lora.adapter_base(path, key)})")
        else:
            lines.append(f"{key}: {path}")
    if not model_cfg.path:
        lines.append(f"{model_key}: the embedded tiny model (written into output_dir/base at the start)")
    if stage == "rl":
        for name in cfg.reward.functions:
            import_reward_function(name)
        if ":" in cfg.rollout.engine:  # an engine class of the user's: imported and checked as the run will
            from rlhf_cli.engines.rollout import engine_class  # torch: only for such an engine

            engine_class(cfg.rollout.engine)
        if cfg.env.name:  # an environment class: imported and checked as the run will (its resets run at setup)
            lines.append(f"env.name: {cfg.env.name} (at most {cfg.env.turns(env_class(cfg.env.name))} turns an episode)")
    if cfg.eval.rule:
        import_reward_function(cfg.eval.rule, "eval.rule")

    data_key = json.dumps([str(model_cfg.path), cfg.seed, model_cfg.max_length, repr(cfg.data)])
    if data_key not in cache:
        cache[data_key] = check_data(cfg, model_cfg)
    return lines + cache[data_key]


def check_data(cfg, model_cfg) -> list[str]:
    """The rows of data.train and data.eval each stage would use (the stage's own count: its config's
    usable_rows), a batch that fits them -> summary lines."""
    from rlhf_cli import data
    from rlhf_cli.training import loop

    tokenizer, note = _tokenizer(model_cfg)
    train_rows, eval_rows = data.stage_rows(cfg.data, cfg.data_kind, cfg.seed)
    source = "embedded task" if cfg.data.train is None else cfg.data.train
    eval_source = cfg.data.eval or ("embedded task" if cfg.data.train is None else "5% held out of data.train")
    counts = {key: cfg.usable_rows(tokenizer, rows, key, lambda: _stop_ids(tokenizer, model_cfg))
              for key, rows in (("data.train", train_rows), ("data.eval", eval_rows))}  # the stage's own count
    if counts["data.train"][0] == 0:
        raise DataError(f"data.train: no usable rows ({counts['data.train'][1]}); raise model.max_length or shorten the rows")
    loop.check_batch_fits(cfg, 1, counts["data.train"][0])  # as the stage will, for one process
    lines = [f"data.train: {counts['data.train'][0]} rows ({source}); {counts['data.train'][1]}",
             f"data.eval: {counts['data.eval'][0]} rows ({eval_source}); {counts['data.eval'][1]}"]
    if note:
        lines.append(note)
    return lines


def _stop_ids(tokenizer, model_cfg) -> list[int]:
    """The stop ids the stage will use (read from the model dir's configs; the EOS for the embedded model)."""
    from rlhf_cli.models import stop_token_ids

    if not model_cfg.path or isinstance(tokenizer, _StructureOnly):
        return [tokenizer.eos_token_id]
    return stop_token_ids(tokenizer, model_cfg.path)


def _tokenizer(model_cfg):
    """The tokenizer the stage will use (cheap: no weights) -> (tokenizer, note)."""
    from rlhf_cli.models import load_tokenizer

    path = model_cfg.path
    if not path:
        from rlhf_cli.models.embedded import build_tokenizer

        return build_tokenizer(), None
    if Path(path).expanduser().exists():
        return load_tokenizer(str(path), "model.path", model_cfg.trust_remote_code), None
    return _StructureOnly(), f"tokenizer of hub model {path} not fetched: chat rows checked for structure only"


def output_dir_state(cfg) -> str:
    """What `rlhf <stage>` will do with output_dir: start, resume (with which safe changes), or refuse a
    different config (the same check as the run's, checkpoint.rerun_changes)."""
    import dataclasses

    from rlhf_cli.training.checkpoint import rerun_changes

    ckpt, changes = rerun_changes(Path(cfg.output_dir), dataclasses.asdict(cfg))
    if ckpt is None:
        return f"output_dir: {cfg.output_dir} (a new run)"
    changed = "; changing " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) if changes else ""
    return f"output_dir: {cfg.output_dir} (resumes from {ckpt.name}{changed})"
