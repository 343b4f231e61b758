"""Rows in, token batches out: loading (local files, hub datasets, the embedded task),
validation with one-line errors, tokenization, packing and batching."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import task
from rlhf_cli.errors import DataError

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------- loading


def load_rows(spec: str, key: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """-> list of row dicts, from any of:

    - a local .json / .jsonl / .parquet / .csv file (all its rows; split and subset unused);
    - a local dataset directory (a hub dataset's files, with subsets declared in its
      README) or a hub name, read by ``datasets.load_dataset(spec, subset, split=split)``;
    - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
    """
    import datasets

    datasets.disable_progress_bars()  # a bad-input error stays the only line on stderr
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        ds = _load_dataset_dir(path, spec, key, split, subset)
    elif path.exists() or suffix in LOCAL_FORMATS or "/" in spec and spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"{key}: file not found: {spec}; check the path")
        if suffix not in LOCAL_FORMATS:
            raise DataError(f"{key}: unsupported file type {suffix or '(none)'} for {spec}; use .jsonl, .json, .parquet or .csv")
        if suffix == ".jsonl":
            _check_jsonl(path, key)
        try:
            ds = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types; report one line
            raise DataError(f"{key}: could not read {spec}: {str(e).splitlines()[0][:200]}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, subset, split=split)
        except Exception as e:
            raise DataError(f"{key}: could not load dataset {spec!r} (split {split!r}): "
                            f"{str(e).splitlines()[0][:200]}; give a local file or check the name") from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{key}: {spec} has no rows; give a non-empty dataset")
    return rows


def _load_dataset_dir(path: Path, spec: str, key: str, split: str, subset: str | None):
    """A saved dataset (save_to_disk) or a dataset repository laid out on disk."""
    import datasets

    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    try:
        if saved:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{key}: {spec} has no split {split!r} (splits: {', '.join(ds)}); "
                                    f"set the split key (data.train_split / data.eval_split)")
                ds = ds[split]
            return ds
        return datasets.load_dataset(str(path), subset, split=split)
    except DataError:
        raise
    except Exception as e:
        what = f"split {split!r}" + (f", subset {subset!r}" if subset else "")
        raise DataError(f"{key}: could not load the dataset directory {spec} ({what}): "
                        f"{str(e).splitlines()[0][:200]}") from None


def _check_jsonl(path: Path, key: str) -> None:
    with open(path, encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{key}: {path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{key}: {path} line {lineno} is not a JSON object; each line must be one row object")
            n += 1
    if n == 0:
        raise DataError(f"{key}: {path} has no rows; give a non-empty dataset")


def stage_rows(data_cfg, kind: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows for a stage: kind is 'sft', 'pairs' or 'prompts'."""
    make = {"sft": task.sft_rows, "pairs": task.preference_rows, "prompts": task.prompt_rows}[kind]
    if data_cfg.train is None:
        train = make(data_cfg.num_train, seed=seed, split="train", n_eval=data_cfg.num_eval)
    else:
        train = train_rows(data_cfg)
    if data_cfg.eval is None:
        # the embedded held-out split; with user train data and no eval file, hold out 5%
        if data_cfg.train is None:
            eval_rows = make(data_cfg.num_eval, seed=seed, split="eval", n_eval=data_cfg.num_eval)
        else:
            n_eval = max(1, len(train) // 20) if len(train) > 1 else 0
            shuffled = random.Random(seed).sample(train, len(train))
            eval_rows, train = shuffled[:n_eval], shuffled[n_eval:]
    else:
        eval_rows = load_rows(data_cfg.eval, "data.eval", data_cfg.eval_split, data_cfg.subset)
    return train, eval_rows[: data_cfg.eval_limit]


def train_rows(data_cfg) -> list[dict]:
    """data.train's rows: one source, or a list of them concatenated in order (a reward model's original
    pairs plus each loop round's, docs/loop.md)."""
    sources = data_cfg.train if isinstance(data_cfg.train, list) else [data_cfg.train]
    rows = []
    for i, spec in enumerate(sources):
        key = "data.train" if len(sources) == 1 else f"data.train[{i}]"
        rows.extend(load_rows(spec, key, data_cfg.train_split, data_cfg.subset))
    return rows


# ---------------------------------------------------------------- row formats


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def render_prompt(tokenizer, prompt) -> str:
    """A prompt as text: plain strings as they are, message lists through the chat template."""
    if isinstance(prompt, str):
        return prompt
    if _is_messages(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("message lists need a chat template and this model's tokenizer has none; "
                             "use plain-text prompt/completion rows or a model with a chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    raise ValueError("prompt must be a string or a list of {role, content} messages")


def prompt_text(tokenizer, row: dict, index: int, key: str) -> str:
    """The prompt of any row format as text: a `prompt` column (string or messages), or a
    `messages` conversation without its final assistant turn (RL, evaluation)."""
    try:
        if row.get("prompt") not in (None, "", []):
            return render_prompt(tokenizer, row["prompt"])
        msgs = row.get("messages")
        if msgs:
            if not _is_messages(msgs):
                raise ValueError("messages must be a list of {role, content}")
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if msgs:
                return render_prompt(tokenizer, msgs)
    except ValueError as e:
        raise DataError(f"{key}: row {index}: {e}") from None
    raise DataError(f"{key}: row {index} has no prompt (fields {sorted(row)}); give a `prompt` column "
                    f"(text or messages) or a `messages` conversation")


def _completion_text(tokenizer, completion) -> str:
    if isinstance(completion, str):
        return completion
    if _is_messages(completion):
        return "".join(m["content"] for m in completion if m["role"] == "assistant")
    raise ValueError("completion must be a string or a list of messages")


def split_sft_row(tokenizer, row: dict, index: int, key: str) -> tuple[str, str]:
    """(prompt text, completion text) from prompt/completion or messages rows (TRL formats)."""
    try:
        if "messages" in row and row["messages"] is not None:
            msgs = row["messages"]
            if not _is_messages(msgs) or not msgs or msgs[-1]["role"] != "assistant":
                raise ValueError("messages must be a list of {role, content} ending with an assistant turn")
            return render_prompt(tokenizer, msgs[:-1]), msgs[-1]["content"]
        if "prompt" in row and "completion" in row:
            return render_prompt(tokenizer, row["prompt"]), _completion_text(tokenizer, row["completion"])
    except ValueError as e:
        raise DataError(f"{key}: row {index}: {e}") from None
    raise DataError(f"{key}: row {index} has fields {sorted(row)}; sft needs prompt/completion or messages")


def split_pair_row(tokenizer, row: dict, index: int, key: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts from explicit-prompt or implicit-prompt (messages) rows."""
    missing = [f for f in ("chosen", "rejected") if row.get(f) in (None, "", [])]
    if missing:
        raise DataError(f"{key}: row {index} has no {' or '.join(missing)}; train-rm needs prompt/chosen/rejected rows")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        try:
            prompt = render_prompt(tokenizer, row["prompt"])
            chosen, rejected = _completion_text(tokenizer, chosen), _completion_text(tokenizer, rejected)
        except ValueError as e:
            raise DataError(f"{key}: row {index}: {e}") from None
    elif _is_messages(chosen) and _is_messages(rejected):
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise DataError(f"{key}: row {index}: chosen and rejected must share every turn but a final assistant "
                            f"turn (implicit prompt), or give an explicit `prompt` column")
        try:
            prompt = render_prompt(tokenizer, chosen[:-1])
        except ValueError as e:
            raise DataError(f"{key}: row {index}: {e}") from None
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    else:
        raise DataError(f"{key}: row {index} has no prompt and chosen/rejected are not message lists")
    if chosen == rejected:
        raise DataError(f"{key}: row {index} has identical chosen and rejected; remove it")
    return prompt, chosen, rejected


# ---------------------------------------------------------------- tokenization


@dataclass
class Example:
    """One tokenized prompt + completion; loss only on the completion."""
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_sft(tokenizer, rows: list[dict], max_length: int, key: str) -> tuple[list[Example], int]:
    """-> (examples, number truncated). Completions end with EOS; over-long rows are cut at max_length."""
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        prompt, completion = split_sft_row(tokenizer, row, i, key)
        p, c = encode(tokenizer, prompt), encode(tokenizer, completion) + [tokenizer.eos_token_id]
        if len(p) + len(c) > max_length:
            truncated += 1
            p = p[-(max_length // 2):] if len(p) > max_length // 2 else p
            c = c[: max_length - len(p)]
        examples.append(Example(p, c))
    return examples, truncated


def packed_batch(examples: list[Example], row_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack examples into rows of `row_length` tokens (first-fit decreasing).

    Position ids restart at 0 for each example, and the attention mask is a
    block-diagonal causal mask (R, 1, L, L) of booleans: no attention across
    examples. Trailing padding forms its own block with label -100.
    Returns input_ids, labels, position_ids (R, L) and attention_mask (R, 1, L, L).
    """
    rows: list[list[Example]] = []
    space: list[int] = []
    for ex in sorted(examples, key=lambda e: -e.length):
        for r, free in enumerate(space):
            if ex.length <= free:
                rows[r].append(ex)
                space[r] -= ex.length
                break
        else:
            rows.append([ex])
            space.append(row_length - ex.length)
    ids = torch.full((len(rows), row_length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    pos = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        at = 0
        for ex in row:
            n = ex.length
            ids[r, at:at + n] = torch.tensor(ex.prompt_ids + ex.completion_ids)
            labels[r, at + len(ex.prompt_ids):at + n] = torch.tensor(ex.completion_ids)
            pos[r, at:at + n] = torch.arange(n)
            at += n
        pos[r, at:] = torch.arange(row_length - at)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": block_causal_mask(pos)}


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, L) positions restarting at 0 per example -> (R, 1, L, L) bool, True = may attend."""
    segment = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def padded_batch(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with attention mask (the no-packing path)."""
    length = max(ex.length for ex in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, ex in enumerate(examples):
        n = ex.length
        ids[r, :n] = torch.tensor(ex.prompt_ids + ex.completion_ids)
        labels[r, len(ex.prompt_ids):n] = torch.tensor(ex.completion_ids)
        mask[r, :n] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, P) ids and mask; masks come from lengths, never from ids != pad."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sequences):
        if s:
            ids[r, length - len(s):] = torch.tensor(s)
            mask[r, length - len(s):] = 1
    return ids, mask


class EpochSampler:
    """Shuffled indices epoch after epoch; its position is part of the checkpoint.

    With `lengths`, indices are length-bucketed: each pool of 32 batches is
    sorted by length and cut into batches whose order is shuffled, so a padded
    batch holds rows of similar length (little padding waste, same epoch).
    """

    def __init__(self, n: int, seed: int, lengths: list[int] | None = None, batch_size: int = 1):
        self.n, self.seed, self.epoch, self.offset = n, seed, 0, 0
        self.lengths, self.batch_size = lengths, batch_size
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        order = rng.sample(range(self.n), self.n)
        if not self.lengths or self.batch_size <= 1:
            return order
        pool = self.batch_size * 32
        batches = []
        for start in range(0, self.n, pool):
            chunk = sorted(order[start:start + pool], key=lambda i: self.lengths[i])
            batches.extend(chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        return [i for b in batches for i in b]

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
            grab = min(k - len(out), self.n - self.offset)
            out.extend(self._order[self.offset:self.offset + grab])
            self.offset += grab
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()
