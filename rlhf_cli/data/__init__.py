"""Rows in, token batches out: loading (local files, hub datasets, the embedded task),
validation with one-line errors, tokenization, packing and batching."""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import task
from rlhf_cli.envs import openings
from rlhf_cli.errors import DataError, first_line

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------- loading


class Row(dict):
    """A data row that remembers where it came from (`origin`, e.g. 'data.train: train.jsonl line 7'), so a
    message about it names the file's own line wherever the hold-out split or a shuffle moved it."""

    origin: str = ""


def where(row: dict, key: str, index: int) -> str:
    """The row's place for a message: its file and line when it was read from a file, else `key: row index`."""
    return getattr(row, "origin", "") or f"{key}: row {index}"


def load_rows(spec: str, key: str, split: str = "train", subset: str | None = None) -> list[dict]:
    """-> list of row dicts (Row, each knowing its file line or row number), from any of:

    - a local .jsonl / .json file (JSON lines or an array of objects), decoded and parsed here, so an error
      names the file's own line; a .csv file (its text decoded here first, then read by `datasets`); .parquet;
    - a local dataset directory (a hub dataset's files, with subsets declared in its
      README) or a hub name, read by ``datasets.load_dataset(spec, subset, split=split)``;
    - a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.
    """
    import datasets

    datasets.disable_progress_bars()  # a bad-input error stays the only line on stderr
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    lines = None  # the file line of each row, where the format has lines
    if path.is_dir():
        rows = _load_dataset_dir(path, spec, key, split, subset).to_list()
    elif path.exists() or suffix in LOCAL_FORMATS or "/" in spec and spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"{key}: file not found: {spec}; check the path")
        if suffix not in LOCAL_FORMATS:
            raise DataError(f"{key}: unsupported file type {suffix or '(none)'} for {spec}; use .jsonl, .json, .parquet or .csv")
        if suffix in (".json", ".jsonl"):
            lines, rows = _json_rows(read_text(path, key), spec, key)
        else:
            if suffix == ".csv":
                lines = _csv_record_lines(read_text(path, key))
            try:
                rows = datasets.load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train").to_list()
            except Exception as e:  # datasets raises many types; report one line
                raise DataError(f"{key}: could not read {spec}: {first_line(e)}") from None
    else:
        try:
            rows = datasets.load_dataset(spec, subset, split=split).to_list()
        except Exception as e:
            raise DataError(f"{key}: could not load dataset {spec!r} (split {split!r}): "
                            f"{first_line(e)}; give a local file or check the name") from None
    if not rows:
        raise DataError(f"{key}: {spec} has no rows; give a non-empty dataset")
    if lines is None or len(lines) != len(rows):
        lines = None
    out = []
    for i, r in enumerate(rows):
        row = Row(r)
        row.origin = f"{key}: {spec} " + (f"line {lines[i]}" if lines else f"row {i + 1}")
        out.append(row)
    return out


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
                        f"{first_line(e)}") from None


def read_text(path: Path, key: str) -> str:
    """A text data file's contents as UTF-8 (a leading BOM dropped): the one decoding path of every text
    data file. Bytes that are not UTF-8 -> one DataError naming the file, line and column, and the fix."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{key}: {path} line {line} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                        f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > utf8{path.suffix})") from None


def _json_rows(text: str, spec: str, key: str) -> tuple[list[int], list[dict]]:
    """(line of each row, rows) of JSON lines or a JSON array of objects. Columns missing from a row are
    None, as `datasets` gives them (reward functions get every column as a keyword)."""
    items = _json_array(text, spec, key) if text.lstrip().startswith("[") else _json_lines(text, spec, key)
    columns: dict[str, None] = {}
    for lineno, obj in items:
        if not isinstance(obj, dict):
            raise DataError(f"{key}: {spec} line {lineno} is not a JSON object; each row must be one object "
                            f"like {{\"prompt\": ..., ...}}")
        columns.update(dict.fromkeys(obj))
    return [n for n, _ in items], [{c: obj.get(c) for c in columns} for _, obj in items]


def _json_lines(text: str, spec: str, key: str) -> list[tuple[int, object]]:
    items = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: {spec} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
    return items


def _json_array(text: str, spec: str, key: str) -> list[tuple[int, object]]:
    """The elements of a JSON array with the line each starts on (read one element at a time)."""
    decoder, items = json.JSONDecoder(), []
    skip = re.compile(r"\s*").match
    pos, line, counted = skip(text, text.index("[") + 1).end(), 1, 0
    if text.startswith("]", pos):
        return items
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{key}: {spec} line {e.lineno} is not valid JSON ({e.msg}); fix that line") from None
        line, counted = line + text.count("\n", counted, pos), pos
        items.append((line, obj))
        pos = skip(text, end).end()
        if text.startswith(",", pos):
            pos = skip(text, pos + 1).end()
            continue
        if text.startswith("]", pos) and not text[pos + 1:].strip():
            return items
        bad = line + text.count("\n", counted, pos)
        raise DataError(f"{key}: {spec} line {bad} is not valid JSON (expected ',' or a final ']'); fix that line")


def _csv_record_lines(text: str) -> list[int]:
    """The line each CSV record (after the header) starts on; blank lines are skipped, as pandas does."""
    reader, starts, last = csv.reader(io.StringIO(text)), [], 0
    try:
        for record in reader:
            if record:
                starts.append(last + 1)
            last = reader.line_num
    except csv.Error:
        return []  # datasets reports the problem
    return starts[1:]


def stage_rows(data_cfg, kind: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows for a stage: kind is 'sft', 'pairs' or 'prompts'. Every row read from a file is
    checked for the fields its kind needs (check_rows) before the hold-out split moves any of them."""
    make = {"sft": task.sft_rows, "pairs": task.preference_rows, "prompts": task.prompt_rows}[kind]
    if data_cfg.train is None:
        train = make(data_cfg.num_train, seed=seed, split="train", n_eval=data_cfg.num_eval)
    else:
        train = train_rows(data_cfg, kind)
    if data_cfg.eval is None:
        # the embedded held-out split; with user train data and no eval file, hold out 5%
        if data_cfg.train is None:
            eval_rows = make(data_cfg.num_eval, seed=seed, split="eval", n_eval=data_cfg.num_eval)
        else:
            if len(train) < 2:
                raise DataError(f"data.train: {data_cfg.train} has {len(train)} row, too few to hold any out for "
                                f"evaluation (without data.eval, 5% of data.train, at least 1 row, is held out); "
                                f"give held-out rows with data.eval=FILE, or more rows")
            n_eval = max(1, len(train) // 20)
            shuffled = random.Random(seed).sample(train, len(train))
            eval_rows, train = shuffled[:n_eval], shuffled[n_eval:]
    else:
        eval_rows = load_rows(data_cfg.eval, "data.eval", data_cfg.eval_split, data_cfg.subset)
        check_rows(eval_rows, kind, "data.eval")
    return train, eval_rows[: data_cfg.eval_limit]


# ---------------------------------------------------------------- row checks (before any model loads)
# Each returns the problem with a row of its kind, or None. stage_rows runs them on every row it reads,
# with the row's file line; split_sft_row / split_pair_row / prompt_text run them again for direct callers.


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _messages_problem(value, field: str) -> str | None:
    """None when `value` is a non-empty list of {role: text, content: text} messages."""
    if not value:
        return f"`{field}` is empty; give at least one {{role, content}} message"
    for n, message in enumerate(value, 1):
        if not isinstance(message, dict):
            return f"`{field}` message {n} is {_describe(message)}, not a {{role, content}} object"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            return f"`{field}` message {n} has role {_describe(role)}; give a role (system, user or assistant)"
        if not isinstance(content, str):
            return (f"`{field}` message {n} ({role}) has content {_describe(content)}; every message needs its "
                    f"text as a string")
    return None


def _text_or_messages_problem(value, field: str, allow_empty: bool) -> str | None:
    if isinstance(value, str):
        return None if value or allow_empty else f"`{field}` is empty; give its text, or remove the row"
    if isinstance(value, list):
        return _messages_problem(value, field)
    return f"{field} must be a string or a list of {{role, content}} messages (got {_describe(value)})"


def sft_row_problem(row: dict) -> str | None:
    """sft: a `messages` conversation ending with an assistant turn, or prompt (may be empty) + completion."""
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "`messages` must be a list of {role, content} ending with an assistant turn (the completion)"
        problem = _messages_problem(msgs, "messages")
        if problem or msgs[-1]["role"] != "assistant":
            return problem or ("messages must be a list of {role, content} ending with an assistant turn "
                               "(the completion)")
        return None
    if "prompt" in row and "completion" in row:
        for field in ("prompt", "completion"):
            if row[field] is None:
                present = sorted(k for k, v in row.items() if v is not None)
                return f"has no `{field}` (null; fields with values: {present}); sft needs prompt/completion or messages"
            problem = _text_or_messages_problem(row[field], field, allow_empty=True)
            if problem:
                return problem
        return None
    return f"has fields {sorted(row)}; sft needs prompt/completion or messages"


def pair_row_problem(row: dict) -> str | None:
    """train-rm: chosen and rejected (text or messages), with an explicit prompt, or as two conversations
    that share every turn but the last (implicit prompt); they must differ."""
    missing = [f for f in ("chosen", "rejected") if row.get(f) is None]
    if missing:
        return f"has no {' or '.join(missing)}; train-rm needs prompt/chosen/rejected rows"
    for field in ("chosen", "rejected"):
        problem = _text_or_messages_problem(row[field], field, allow_empty=False)
        if problem:
            return problem
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        problem = _text_or_messages_problem(row["prompt"], "prompt", allow_empty=True)
        if problem:
            return problem
    elif not (isinstance(chosen, list) and isinstance(rejected, list)):
        return "has no prompt and chosen/rejected are not message lists; give a `prompt` column"
    elif chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        return ("chosen and rejected must share every turn but a final assistant turn (implicit prompt), or give "
                "an explicit `prompt` column")
    if chosen == rejected:
        return "has identical chosen and rejected; remove it"
    return None


def prompt_row_problem(row: dict) -> str | None:
    """rl, evaluation: a `prompt` (non-empty text or messages), or a `messages` conversation with a turn
    before its final assistant turn."""
    if row.get("prompt") is not None:
        return _text_or_messages_problem(row["prompt"], "prompt", allow_empty=False)
    msgs = row.get("messages")
    if msgs is not None:
        if not isinstance(msgs, list):
            return f"messages must be a list of {{role, content}} messages (got {_describe(msgs)})"
        problem = _messages_problem(msgs, "messages")
        if problem:
            return problem
        if len(msgs) == 1 and msgs[0]["role"] == "assistant":
            return "`messages` holds only an assistant turn; a prompt needs the turns before it"
        return None
    return (f"has no prompt (fields {sorted(row)}); give a `prompt` column (text or messages) or a `messages` "
            f"conversation")


ROW_PROBLEMS = {"sft": sft_row_problem, "pairs": pair_row_problem, "prompts": prompt_row_problem}


def check_rows(rows: list[dict], kind: str, key: str) -> None:
    """DataError naming the first row of `rows` that `kind` ('sft', 'pairs', 'prompts') cannot use."""
    problem_of = ROW_PROBLEMS[kind]
    for i, row in enumerate(rows):
        problem = problem_of(row) if isinstance(row, dict) else f"is {_describe(row)}, not a row object"
        if problem:
            raise DataError(f"{where(row, key, i)}: {problem}")


def train_rows(data_cfg, kind: str) -> list[dict]:
    """data.train's rows, checked for `kind`: one source, or a list of them concatenated in order (a reward
    model's original pairs plus each loop round's, docs/loop.md)."""
    sources = data_cfg.train if isinstance(data_cfg.train, list) else [data_cfg.train]
    rows = []
    for i, spec in enumerate(sources):
        key = "data.train" if len(sources) == 1 else f"data.train[{i}]"
        loaded = load_rows(spec, key, data_cfg.train_split, data_cfg.subset)
        check_rows(loaded, kind, key)
        rows.extend(loaded)
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
        return apply_template(tokenizer, prompt, add_generation_prompt=True)
    raise ValueError("prompt must be a string or a list of {role, content} messages")


def apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text (BOS included where the template writes it: Llama 3, Gemma); a template
    that refuses the messages (Gemma: no system role; roles must alternate) -> ValueError naming why."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception, or an error inside the template
        raise ValueError(f"the model's chat template refused these messages ({first_line(e)}); fix the "
                         f"conversation to fit the template (e.g. Gemma's has no system role: put that text in "
                         f"the first user turn)") from None


def _assistant_turn(tokenizer, prompt_messages: list[dict], reply: list[dict], prompt: str) -> str:
    """The reply as the chat template writes it after the rendered prompt, end-of-turn token included
    (Qwen: `...<|im_end|>\n`, Llama 3: `...<|eot_id|>`, Gemma: `...<end_of_turn>\n`), so SFT trains the
    model to end its turn the way generation stops. A template that rewrites earlier turns once a reply
    follows (no shared prefix): the reply's content, which then gets EOS."""
    full = apply_template(tokenizer, prompt_messages + reply, add_generation_prompt=False)
    return full[len(prompt):] if full.startswith(prompt) else _completion_text(tokenizer, reply)


def _require(kind: str, row: dict, index: int, key: str) -> None:
    problem = ROW_PROBLEMS[kind](row)
    if problem:
        raise DataError(f"{where(row, key, index)}: {problem}")


def prompt_text(tokenizer, row: dict, index: int, key: str) -> str:
    """The prompt of any row format as text: a `prompt` column (string or messages), or a
    `messages` conversation without its final assistant turn (RL, evaluation)."""
    _require("prompts", row, index, key)
    try:
        if row.get("prompt") is not None:
            return render_prompt(tokenizer, row["prompt"])
        msgs = row["messages"]
        return render_prompt(tokenizer, msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs)
    except ValueError as e:
        raise DataError(f"{where(row, key, index)}: {e}") from None


def prompt_texts(tokenizer, rows: list[dict], key: str, env_cls=None, timeout_s: float = 10.0) -> list[str]:
    """Every row's prompt as text (prompt_text); with an environment class (env.name), the opening messages it
    gives each row, through the chat template (a reset that fails is one error line naming the row)."""
    if env_cls is None:
        return [prompt_text(tokenizer, row, i, key) for i, row in enumerate(rows)]
    return [render_prompt(tokenizer, messages) for messages in openings(env_cls, rows, timeout_s, key)]


def _completion_text(tokenizer, completion) -> str:
    if isinstance(completion, str):
        return completion
    if _is_messages(completion):
        return "".join(m["content"] for m in completion if m["role"] == "assistant")
    raise ValueError("completion must be a string or a list of messages")


def split_sft_row(tokenizer, row: dict, index: int, key: str) -> tuple[str, str]:
    """(prompt text, completion text) from prompt/completion or messages rows (TRL formats)."""
    _require("sft", row, index, key)
    try:
        if row.get("messages") is not None:
            msgs = row["messages"]
            prompt = render_prompt(tokenizer, msgs[:-1])
            return prompt, _assistant_turn(tokenizer, msgs[:-1], msgs[-1:], prompt)
        prompt, completion = render_prompt(tokenizer, row["prompt"]), row["completion"]
        if _is_messages(row["prompt"]) and _is_messages(completion):
            return prompt, _assistant_turn(tokenizer, row["prompt"], completion, prompt)
        return prompt, _completion_text(tokenizer, completion)
    except ValueError as e:
        raise DataError(f"{where(row, key, index)}: {e}") from None


def split_pair_row(tokenizer, row: dict, index: int, key: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts from explicit-prompt or implicit-prompt (messages) rows."""
    _require("pairs", row, index, key)
    chosen, rejected = row["chosen"], row["rejected"]
    try:
        if row.get("prompt") is not None:
            prompt = render_prompt(tokenizer, row["prompt"])
            chosen, rejected = _completion_text(tokenizer, chosen), _completion_text(tokenizer, rejected)
        else:  # implicit prompt: the turns the two conversations share
            prompt = render_prompt(tokenizer, chosen[:-1])
            chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    except ValueError as e:
        raise DataError(f"{where(row, key, index)}: {e}") from None
    if chosen == rejected:
        raise DataError(f"{where(row, key, index)}: has identical chosen and rejected; remove it")
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
    """Token ids of text as it is: no special tokens added (a completion, a continuation)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=16)
def added_bos_id(tokenizer) -> int | None:
    """The BOS id this tokenizer puts before a text (Llama, Gemma, Mistral); None when it adds none (Qwen, GPT-2)."""
    probe = "a"
    with_specials, bare = tokenizer(probe)["input_ids"], encode(tokenizer, probe)
    bos = tokenizer.bos_token_id
    return bos if bos is not None and with_specials[:1] == [bos] and bare[:1] != [bos] else None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a sequence's first text (a prompt; prompt + response for a reward model) with exactly one
    BOS at the start where the tokenizer adds one: a chat template that writes BOS itself (Llama 3, Gemma)
    keeps its own, plain text gets the tokenizer's, never two (tokenizing a rendered template with
    add_special_tokens=True would double it)."""
    ids = encode(tokenizer, text)
    bos = added_bos_id(tokenizer)
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def cut_left(ids: list[int], n: int, tokenizer) -> list[int]:
    """The last n ids of a prompt, its BOS kept first when it had one (so a cut prompt still starts with it)."""
    if len(ids) <= n:
        return ids
    bos = added_bos_id(tokenizer)
    return [bos] + ids[len(ids) - n + 1:] if bos is not None and ids[:1] == [bos] and n > 1 else ids[len(ids) - n:]


def end_of_turn(tokenizer, completion_ids: list[int], stop_ids: list[int]) -> list[int]:
    """A completion ending at its stop token: a chat template's turn already ends with one (anything but
    whitespace after it stays; Qwen's trailing newline goes, as generation stops at `<|im_end|>`); a
    completion without one gets the tokenizer's EOS."""
    for end in range(len(completion_ids) - 1, -1, -1):
        if completion_ids[end] in stop_ids:
            return completion_ids[:end + 1]
        if tokenizer.decode(completion_ids[end:end + 1]).strip():
            break
    return completion_ids + [tokenizer.eos_token_id]


def tokenize_sft(tokenizer, rows: list[dict], max_length: int, key: str,
                 stop_ids: list[int] | None = None) -> tuple[list[Example], int]:
    """-> (examples, number truncated). Completions end with a stop token (end_of_turn: the template's
    end-of-turn, else EOS; stop_ids: models.stop_token_ids, default the EOS); prompts start with one BOS
    where the tokenizer uses one; over-long rows are cut at max_length."""
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    examples, truncated = [], 0
    for i, row in enumerate(rows):
        prompt, completion = split_sft_row(tokenizer, row, i, key)
        p, c = encode_prompt(tokenizer, prompt), end_of_turn(tokenizer, encode(tokenizer, completion), stop_ids)
        if len(p) + len(c) > max_length:
            truncated += 1
            p = cut_left(p, max_length // 2, tokenizer)
            c = c[: max_length - len(p)]
        examples.append(Example(p, c))
    return examples, truncated


@dataclass
class PairExample:
    """One tokenized preference pair for a policy (dpo): the prompt with each response as a completion ending at
    its stop token, tokenized as sft tokenizes a row (tokenize_sft), so a pair's log-probs are those of what the
    policy would generate."""
    chosen: Example
    rejected: Example

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


def tokenize_preference(tokenizer, rows: list[dict], max_length: int, key: str,
                        stop_ids: list[int] | None = None) -> tuple[list[PairExample], int]:
    """Pair rows (train-rm's formats) -> (pairs, number dropped). A pair longer than max_length is dropped, not
    cut: a cut response's log-prob is that of another response, and cutting both can remove the tokens that differ."""
    stop_ids = stop_ids or [tokenizer.eos_token_id]
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        prompt, chosen, rejected = split_pair_row(tokenizer, row, i, key)
        p = encode_prompt(tokenizer, prompt)
        pair = PairExample(*(Example(p, end_of_turn(tokenizer, encode(tokenizer, text), stop_ids))
                             for text in (chosen, rejected)))
        if pair.length > max_length:
            dropped += 1
            continue
        pairs.append(pair)
    return pairs, dropped


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of items of `lengths` in rows of `capacity`, longest first (ties in their
    order), each into the first row it fits (sft's packing, dpo's pair blocks)."""
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return rows


def packed_batch(examples: list[Example], row_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack examples into rows of `row_length` tokens (first-fit decreasing).

    Position ids restart at 0 for each example, and the attention mask is a
    block-diagonal causal mask (R, 1, L, L) of booleans: no attention across
    examples. Trailing padding forms its own block with label -100.
    Returns input_ids, labels, position_ids (R, L) and attention_mask (R, 1, L, L).
    """
    rows = [[examples[i] for i in row] for row in first_fit([ex.length for ex in examples], row_length)]
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
