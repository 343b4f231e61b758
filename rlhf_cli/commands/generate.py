"""`rlhf generate model.path=CKPT output=gens.jsonl [key=value ...]`: K sampled responses per prompt.

    rlhf generate model.path=runs/rl/final output=gens.jsonl                  # embedded task's training prompts
    rlhf generate model.path=runs/rl/final data.prompts=prompts.jsonl samples_per_prompt=4 \\
        temperature=1.0 max_new_tokens=64 seed=1 output=gens.jsonl device=cpu device.threads=2
    torchrun --nproc-per-node 8 -m rlhf_cli generate model.path=runs/rl/final output=gens.jsonl device=cuda

With env.name=module:Class each response is an episode against that environment (docs/environments.md): the
row's `responses` are the episodes' last assistant turns and `episodes` holds each one (turns, turn rewards,
the conversation, how it ended).

The first step of the RLHF loop (docs/loop.md): sample the policy, then `rlhf label`
the responses, then `rlhf train-rm` on the pairs. One JSONL row per prompt: the row's
own columns, `prompt` as the text the model saw (message lists rendered through the
chat template), `responses`, a list of K strings, and `stopped`, K flags: whether each response ended at a
stop token (false: cut at max_new_tokens, an unfinished answer `rlhf label` leaves out of its pairs).

Resumable: rows are appended and flushed (fsync) as each batch of prompts finishes.
A rerun with the same settings continues after the last complete row (a line torn
by a kill is discarded), so nothing is generated twice or lost; the settings live
beside the output in OUTPUT.meta.json and a rerun with other settings is refused.
Reproducible: response j of prompt i draws token t with uniform noise keyed by
(seed, i * K + j) (runtime.keyed_uniform through SamplingParams.noise_key), so a
killed-and-resumed run writes the same file as an uninterrupted one, and N ranks
under torchrun (each samples every N-th batch; rank 0 appends them in order) write
the file one process writes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from rlhf_cli import task
from rlhf_cli.commands import helptext
from rlhf_cli.commands.evaluate import decode_plan
from rlhf_cli.config import field_docs
from rlhf_cli.config.tools import GenerateToolConfig, parse_settings
from rlhf_cli.envs import env_class
from rlhf_cli.errors import DataError, UserError
from rlhf_cli.training.tracking import console


def settings(cfg: GenerateToolConfig) -> dict:
    """What decides the file's content: a rerun continues only with the same."""
    keep = dataclasses.asdict(cfg)
    keep.pop("output")
    keep.pop("device")
    keep.pop("batch_size")  # rows are keyed per prompt: any batch size writes the same rows
    keep.pop("micro_batch_tokens")  # nor any split of a batch into decode calls
    return keep


def print_help() -> None:
    helptext.print_text(__doc__.strip())
    print_keys(GenerateToolConfig, "generate")


def print_keys(schema, tool: str) -> None:
    """Every key of a tool's schema with its default and doc, on stdout."""
    rows = [(key, helptext.render(_default(schema, key)), help_text) for key, _, help_text in field_docs(schema)]
    helptext.print_keys(f"keys of `rlhf {tool}`", rows)


def _default(schema, dotted: str):
    """The default of a dotted key of a schema dataclass, without constructing it (required keys have none)."""
    head, _, rest = dotted.partition(".")
    field = next(f for f in dataclasses.fields(schema) if f.name == head)
    if rest:
        return _default(field.default_factory if field.default_factory is not dataclasses.MISSING else field.type, rest)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def main(args: list[str]) -> None:
    if any(a in ("-h", "--help") for a in args):
        print_help()
        return
    cfg = parse_settings(GenerateToolConfig, args, "generate", "model.path=runs/rl/final output=gens.jsonl")
    generate(cfg)


# ---------------------------------------------------------------- the output file


def meta_path(output: Path) -> Path:
    return output.with_name(output.name + ".meta.json")


def read_done_rows(output: Path) -> tuple[list[dict], int]:
    """(complete rows of an existing output, the byte length they take); bytes after the last newline are a
    line torn by a kill (cut_torn_line removes them)."""
    if not output.exists():
        return [], 0
    raw = output.read_bytes()
    end = raw.rfind(b"\n") + 1
    rows = []
    for lineno, line in enumerate(raw[:end].splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise DataError(f"output: {output} line {lineno} is not a JSON row; it was not written by an "
                            f"interrupted `rlhf generate`: choose another output=... or remove the file") from None
    return rows, end


def cut_torn_line(output: Path, complete_bytes: int) -> None:
    if output.exists() and output.stat().st_size > complete_bytes:
        with open(output, "r+b") as f:
            f.truncate(complete_bytes)


def check_resumable(output: Path, cfg: GenerateToolConfig) -> None:
    """An existing output continues only when it was written by generate with the same settings."""
    meta = meta_path(output)
    if not output.exists():
        return
    if not meta.exists():
        raise UserError(f"output: {output} exists and was not written by `rlhf generate` (no {meta.name}); "
                        f"choose another output=... or remove it")
    before = json.loads(meta.read_text())
    now = settings(cfg)
    diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise UserError(f"output: {output} was generated with {k}={before.get(k)!r}, not {now.get(k)!r}; "
                        f"rerun with the same settings to continue it, or choose another output=...")


def append_rows(f, rows: list[dict]) -> None:
    """One write of whole lines, flushed to disk: a kill leaves complete rows and at most one torn line."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


# ---------------------------------------------------------------- generation


def load_prompt_rows(cfg: GenerateToolConfig) -> tuple[list[dict], str]:
    from rlhf_cli import data

    if cfg.data.prompts is None:
        rows = task.prompt_rows(cfg.data.num_prompts if cfg.data.split == "train" else cfg.data.num_eval,
                                seed=cfg.seed, split=cfg.data.split, n_eval=cfg.data.num_eval)
        return rows, f"embedded task, {cfg.data.split} split (seed {cfg.seed}, {len(rows)} prompts)"
    rows = data.load_rows(cfg.data.prompts, "data.prompts", cfg.data.split, cfg.data.subset)
    return rows[: cfg.data.limit] if cfg.data.limit else rows, cfg.data.prompts


def _check_model(cfg: GenerateToolConfig) -> None:
    """model.path's kind, size and engine from its config.json: a wrong model fails before any weights load."""
    from rlhf_cli.engines.rollout import check_engine
    from rlhf_cli.models import CAUSAL_LM, check_generation_fits, check_model_dir, check_model_kind

    check_model_dir(cfg.model.path, "model.path")
    check_model_kind(cfg.model.path, "model.path", CAUSAL_LM)
    check_generation_fits(cfg.model.path, {"max_new_tokens": cfg.max_new_tokens})
    check_engine(cfg.engine, cfg.model.path, "model.path", "engine")  # vllm: an architecture it runs


def _start_output(output: Path, complete_bytes: int, cfg: GenerateToolConfig) -> None:
    """Rank 0, before appending: cut a torn last line, and write the run's settings beside a new output."""
    cut_torn_line(output, complete_bytes)
    if not meta_path(output).exists():
        from rlhf_cli.training.checkpoint import write_json

        write_json(meta_path(output), settings(cfg))


def generate(cfg: GenerateToolConfig) -> None:
    """Sample K responses for every prompt not yet in cfg.output, appending one row per prompt."""
    output = Path(cfg.output).expanduser()
    if not output.absolute().parent.is_dir():
        raise UserError(f"output: the directory of {cfg.output} does not exist; create it or choose another output=...")
    check_resumable(output, cfg)
    # the model's kind and size from its config.json, the prompts, the tokenizer and the rows already written
    # first: a wrong model or a data problem fails before any weights load
    import torch

    from rlhf_cli import data
    from rlhf_cli.engines.rollout import make_engine
    from rlhf_cli.models import load_causal_lm, load_tokenizer, position_limit
    from rlhf_cli.training import runtime

    _check_model(cfg)
    rows, source = load_prompt_rows(cfg)
    tokenizer = load_tokenizer(cfg.model.path, "model.path", cfg.model.trust_remote_code)
    env_cls = env_class(cfg.env.name) if cfg.env.name else None  # episodes: prompts are the openings
    prompts = data.prompt_texts(tokenizer, rows, "data.prompts", env_cls, cfg.env.timeout_s)
    done, complete_bytes = read_done_rows(output)  # every rank reads before any rank writes (setup is a rendezvous)
    if len(done) > len(rows) or any(r.get("prompt") != p for r, p in zip(done, prompts)):
        raise UserError(f"output: {output} holds rows of other prompts than {source}; rerun with the same "
                        f"data.prompts to continue it, or choose another output=...")

    rt = runtime.setup(cfg.device, cfg.seed)  # under torchrun: one process per device, each samples its batches
    try:
        say = console.print if rt.is_main else (lambda *a, **k: None)
        if rt.is_main:
            _start_output(output, complete_bytes, cfg)
        if len(done) == len(rows):
            say(f"{output}: all {len(rows)} prompts already have responses; nothing to do", markup=False)
            return
        plan = decode_plan(cfg.micro_batch_tokens, rt.device, cfg.model.path, cfg.model, tokenizer, prompts,
                           cfg.max_new_tokens)  # before the weights load
        model = load_causal_lm(cfg.model.path, "model.path", cfg.model.dtype, rt.device, cfg.model.trust_remote_code)
        engine = make_engine(cfg.engine, model, tokenizer, memory=plan)  # local engines: decode calls within the plan
        positions = position_limit(cfg.model.path)  # a prompt longer than the room left is cut from the left
        say(f"generate: {len(rows)} prompts from {source}, {cfg.samples_per_prompt} responses each"
            f"{f' on {rt.world_size} ranks' if rt.distributed else ''}, "
            f"{'resuming at prompt ' + str(len(done)) if done else 'starting'}; writing {output}; "
            f"{plan.describe()}", markup=False)
        batches = grid_batches(len(done), len(rows), cfg.batch_size)
        t0 = time.time()
        with torch.no_grad():
            for first in range(0, len(batches), rt.world_size):  # one batch per rank, then rank 0 appends them in order
                mine = batches[first + rt.rank] if first + rt.rank < len(batches) else None
                texts = (sample_batch(engine, tokenizer, prompts, mine, cfg, rt.device, positions, rows, env_cls)
                         if mine else ([], {}))
                gathered = rt.all_gather_object((mine, texts))
                if rt.is_main:
                    with open(output, "a", encoding="utf-8") as f:
                        for bounds, (batch_texts, extra) in gathered:
                            if bounds:
                                append_rows(f, batch_rows(rows, prompts, bounds, batch_texts, cfg.samples_per_prompt,
                                                          extra))
                last = max(b[1] for b, _ in gathered if b)
                say(f"  {last}/{len(rows)} prompts ({time.time() - t0:.1f} s)", markup=False)
        say(f"wrote {output}: {len(rows)} prompts x {cfg.samples_per_prompt} responses", markup=False)
    finally:
        runtime.teardown()


def grid_batches(start: int, n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, n) cut at multiples of batch_size: a resumed run batches its prompts as the first run did."""
    bounds = []
    while start < n:
        end = min(n, (start // batch_size + 1) * batch_size)
        bounds.append((start, end))
        start = end
    return bounds


def sample_batch(engine, tokenizer, prompts: list[str], bounds: tuple[int, int], cfg: GenerateToolConfig,
                 device, positions: int | None, rows: list[dict], env_cls=None) -> tuple[list[str], dict[str, list]]:
    """K responses for each prompt of prompts[start:end], flat: response j of prompt i at (i - start) * K + j.
    Prompts are tokenized as rl and eval do (one BOS where the tokenizer adds one), cut from the left to fit
    the model's positions with the responses. -> (texts, {column: one value a response}): with an environment,
    K episodes a prompt, their last assistant turns and `episodes` (each one's turns, rewards, conversation);
    else `stopped` (whether each response ended at a stop token, not cut at max_new_tokens: rlhf label pairs
    finished responses only)."""
    from rlhf_cli import data
    from rlhf_cli.engines.episodes import run_episodes
    from rlhf_cli.engines.rollout import SamplingParams, decode_responses

    start, end = bounds
    K = cfg.samples_per_prompt
    room = max(1, positions - cfg.max_new_tokens) if positions else None
    encoded = [data.encode_prompt(tokenizer, p) for p in prompts[start:end]]
    encoded = [data.cut_left(e, room, tokenizer) if room else e for e in encoded]
    ids, mask = data.left_pad([e for e in encoded for _ in range(K)], tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            noise_key=(cfg.seed, 0, start * K))  # row i*K+j draws its own noise, on any rank
    if env_cls is not None:
        rollout = run_episodes(engine, tokenizer, env_cls, [rows[i] for i in range(start, end) for _ in range(K)],
                               [e for e in encoded for _ in range(K)], params, cfg.env.turns(env_cls),
                               positions or 1 << 30, cfg.env.timeout_s, device)  # no position limit: none
        return decode_responses(tokenizer, rollout), {"episodes": [e.summary() for e in rollout.episodes]}
    rollout = engine.generate(ids.to(device), mask.to(device), params)
    return decode_responses(tokenizer, rollout), {"stopped": rollout.stopped.tolist()}


def batch_rows(rows: list[dict], prompts: list[str], bounds: tuple[int, int], texts: list[str], K: int,
               extra: dict[str, list] | None = None) -> list[dict]:
    """One row a prompt: its columns, the prompt text, its K responses, and K values of each `extra` column
    (`stopped`; `episodes` with an environment)."""
    start, end = bounds
    return [{**rows[i], "prompt": prompts[i], "responses": texts[(i - start) * K:(i - start + 1) * K],
             **{key: values[(i - start) * K:(i - start + 1) * K] for key, values in (extra or {}).items()}}
            for i in range(start, end)]
