"""The data formats TRL's trainers take, from every local file type and from dataset dirs with
splits and subsets: each row must tokenize to exactly the text the stage trains on.

Expected texts are written out by hand; the embedded tokenizer's chat template renders a
message as `<|role|>content` + newline (assistant turns end with `<eos>` instead).
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from rlhf_cli import data
from rlhf_cli.errors import DataError
from rlhf_cli.models.embedded import build_tokenizer
from rlhf_cli.models.scoring import tokenize_pairs

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "2+2?"}
ANSWER = {"role": "assistant", "content": "4"}
WRONG = {"role": "assistant", "content": "5"}
CHAT_PROMPT = "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"  # add_generation_prompt=True


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write(path, rows):
    """rows -> a file of the type its suffix names (json is a JSON array, jsonl one object a line)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# (rows, file types, expected (prompt, completion)) for sft
SFT_FORMATS = {
    "prompt/completion": ([{"prompt": "Q: 2+2?\n", "completion": "A: 4"}], ("jsonl", "json", "parquet", "csv"),
                          ("Q: 2+2?\n", "A: 4")),
    "prompt/completion, conversational": ([{"prompt": [SYSTEM, USER], "completion": [ANSWER]}], ("jsonl", "json", "parquet"),
                                          (CHAT_PROMPT, "4")),
    "messages": ([{"messages": [SYSTEM, USER, ANSWER]}], ("jsonl", "json", "parquet"), (CHAT_PROMPT, "4")),
}


@pytest.mark.parametrize("name,suffix", [(n, s) for n, (_, types, _) in SFT_FORMATS.items() for s in types])
def test_sft_formats_tokenize_to_prompt_and_completion(tmp_path, tok, name, suffix):
    rows, _, (prompt, completion) = SFT_FORMATS[name]
    loaded = data.load_rows(write(tmp_path / f"train.{suffix}", rows * 3), "data.train")
    assert len(loaded) == 3
    examples, truncated = data.tokenize_sft(tok, loaded, max_length=160, key="data.train")
    assert truncated == 0
    assert examples[0].prompt_ids == ids(tok, prompt)
    assert examples[0].completion_ids == ids(tok, completion) + [tok.eos_token_id]  # loss on these only


PAIR_FORMATS = {
    "prompt/chosen/rejected": ([{"prompt": "Q: 2+2?\n", "chosen": "A: 4", "rejected": "A: 5"}],
                               ("jsonl", "json", "parquet", "csv"), ("Q: 2+2?\n", "A: 4", "A: 5")),
    "explicit prompt, conversational": ([{"prompt": [SYSTEM, USER], "chosen": [ANSWER], "rejected": [WRONG]}],
                                        ("jsonl", "parquet"), (CHAT_PROMPT, "4", "5")),
    "implicit prompt (chosen/rejected conversations)": (
        [{"chosen": [SYSTEM, USER, ANSWER], "rejected": [SYSTEM, USER, WRONG]}], ("json", "parquet"),
        (CHAT_PROMPT, "4", "5")),
}


@pytest.mark.parametrize("name,suffix", [(n, s) for n, (_, types, _) in PAIR_FORMATS.items() for s in types])
def test_preference_formats_tokenize_to_prompt_chosen_rejected(tmp_path, tok, name, suffix):
    rows, _, (prompt, chosen, rejected) = PAIR_FORMATS[name]
    loaded = data.load_rows(write(tmp_path / f"pairs.{suffix}", rows * 2), "data.train")
    pairs, dropped = tokenize_pairs(tok, loaded, max_length=160, key="data.train", use_margin=True)
    assert dropped == 0 and len(pairs) == 2
    assert pairs[0].prompt == prompt
    assert pairs[0].chosen_ids == ids(tok, prompt + chosen) and pairs[0].rejected_ids == ids(tok, prompt + rejected)


@pytest.mark.parametrize("suffix,prompt,expected", [
    ("jsonl", "Start at 3. add 1.\n", "Start at 3. add 1.\n"),
    ("csv", "Start at 3. add 1.\n", "Start at 3. add 1.\n"),
    ("parquet", [SYSTEM, USER], CHAT_PROMPT),
])
def test_prompt_only_rows_for_rl_keep_their_other_columns(tmp_path, tok, suffix, prompt, expected):
    loaded = data.load_rows(write(tmp_path / f"prompts.{suffix}", [{"prompt": prompt, "answer": "4"}]), "data.train")
    assert data.render_prompt(tok, loaded[0]["prompt"]) == expected  # what the rl stage renders
    assert data.prompt_text(tok, loaded[0], 0, "data.train") == expected
    assert str(loaded[0]["answer"]) == "4"  # passed on to reward functions (csv reads it as a number)


def test_prompt_text_of_a_messages_row_drops_the_final_answer(tok):
    assert data.prompt_text(tok, {"messages": [SYSTEM, USER, ANSWER]}, 0, "data.eval") == CHAT_PROMPT


def test_dataset_dir_with_subsets_and_splits(tmp_path, tok):
    """A hub dataset's layout on disk: load_dataset(name, subset, split=...) is the same call as for a hub name."""
    root = tmp_path / "my_dataset"
    for subset in ("easy", "hard"):
        (root / subset).mkdir(parents=True)
        for split in ("train", "test"):
            write(root / subset / f"{split}.jsonl",
                  [{"prompt": f"{subset} {split} {i}\n", "completion": "ok"} for i in range(4 if split == "train" else 2)])
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n"
        f"  - split: test\n    path: {s}/test.jsonl\n" for s in ("easy", "hard")) + "---\n")
    cfg = SimpleNamespace(train=str(root), eval=str(root), train_split="train", eval_split="test", subset="hard",
                          num_train=10, num_eval=10, eval_limit=200)
    train, held_out = data.stage_rows(cfg, "sft", seed=0)
    assert [r["prompt"] for r in train] == [f"hard train {i}\n" for i in range(4)]
    assert [r["prompt"] for r in held_out] == ["hard test 0\n", "hard test 1\n"]
    examples, _ = data.tokenize_sft(tok, held_out, 160, "data.eval")
    assert examples[1].prompt_ids == ids(tok, "hard test 1\n")
    with pytest.raises(DataError, match="split 'validation'"):
        data.load_rows(str(root), "data.eval", split="validation", subset="easy")


def test_saved_dataset_dict_dir(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}] * 3),
                          "test": datasets.Dataset.from_list([{"prompt": "c", "completion": "d"}])}
                         ).save_to_disk(str(tmp_path / "saved"))
    assert data.load_rows(str(tmp_path / "saved"), "data.eval", split="test") == [{"prompt": "c", "completion": "d"}]
    with pytest.raises(DataError, match="no split 'dev'"):
        data.load_rows(str(tmp_path / "saved"), "data.eval", split="dev")


BAD_ROWS = [
    ("sft", {"question": "a", "answer": "b"}, "needs prompt/completion or messages"),
    ("sft", {"messages": [SYSTEM, USER]}, "ending with an assistant turn"),
    ("pairs", {"prompt": "q", "chosen": "a"}, "has no rejected"),
    ("pairs", {"chosen": [USER, ANSWER], "rejected": [SYSTEM, USER, WRONG]}, "must share every turn"),
    ("pairs", {"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt must be a string"),
    ("prompts", {"completion": "x"}, "has no prompt"),
    # field types (issue 16): null and non-text content, non-text fields, empty ones say "empty"
    ("sft", {"messages": [USER, {"role": "assistant", "content": None}]}, "message 2 (assistant) has content null"),
    ("sft", {"messages": [USER, {"role": "assistant", "content": 4}]}, "has content the number 4"),
    ("sft", {"messages": [{"content": "hi"}, ANSWER]}, "message 1 has role null"),
    ("sft", {"messages": ["hi", ANSWER]}, "message 1 is a str, not a {role, content} object"),
    ("sft", {"prompt": "q", "completion": None}, "has no `completion` (null; fields with values: ['prompt'])"),
    ("sft", {"prompt": "q", "completion": 7}, "completion must be a string or a list"),
    ("pairs", {"prompt": "q", "chosen": 1.5, "rejected": "b"}, "chosen must be a string"),
    ("pairs", {"prompt": "q", "chosen": "a", "rejected": ""}, "`rejected` is empty"),
    ("pairs", {"prompt": "q", "chosen": [{"role": "assistant", "content": None}], "rejected": "b"}, "has content null"),
    ("pairs", {"prompt": "q", "chosen": "same", "rejected": "same"}, "identical chosen and rejected"),
    ("prompts", {"prompt": ""}, "`prompt` is empty"),
    ("prompts", {"prompt": []}, "`prompt` is empty"),
    ("prompts", {"prompt": True}, "got the boolean true"),
    ("prompts", {"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "has content a list"),
    ("prompts", {"messages": [ANSWER]}, "holds only an assistant turn"),
]


@pytest.mark.parametrize("kind,row,fragment", BAD_ROWS)
def test_bad_rows_name_the_row_and_the_fix(tok, kind, row, fragment):
    split = {"sft": lambda: data.split_sft_row(tok, row, 7, "data.train"),
             "pairs": lambda: data.split_pair_row(tok, row, 7, "data.train"),
             "prompts": lambda: data.prompt_text(tok, row, 7, "data.train")}[kind]
    with pytest.raises(DataError, match=re.escape(fragment)) as err:
        split()
    assert "row 7" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind,row,fragment", BAD_ROWS)
def test_every_row_is_checked_when_read_with_its_file_line(tmp_path, kind, row, fragment):
    """The same problems, found by stage_rows as it reads the file (before any tokenizer or model), named by the
    file's own line: the bad row is line 3 of a file whose line 2 is blank."""
    good = {"sft": {"prompt": "q", "completion": "a"}, "pairs": {"prompt": "q", "chosen": "a", "rejected": "b"},
            "prompts": {"prompt": "q"}}[kind]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(row) + "\n" + json.dumps(good) + "\n")
    cfg = SimpleNamespace(train=str(path), eval=None, train_split="train", eval_split="test", subset=None,
                          num_train=10, num_eval=10, eval_limit=200)
    with pytest.raises(DataError, match=re.escape(fragment)) as err:
        data.stage_rows(cfg, kind, seed=0)
    assert str(err.value).startswith(f"data.train: {path} line 3: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("suffix,content,fragment", [
    (".jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', "line 2 is not valid UTF-8 (byte 0xe9 at column 16)"),
    (".json", b'[\n {"prompt": "a"},\n {"prompt": "\xff"}\n]', "line 3 is not valid UTF-8 (byte 0xff at column 14)"),
    (".csv", b"prompt,answer\nq,1\nr\xe9,2\n", "line 3 is not valid UTF-8 (byte 0xe9 at column 2)"),
    (".json", b'[\n {"prompt": "a"}\n {"prompt": "b"}\n]', "line 3 is not valid JSON"),
    (".json", b'[{"prompt": "a"}, 3]', "line 1 is not a JSON object"),
])
def test_one_decoding_path_names_the_line_of_bad_bytes(tmp_path, suffix, content, fragment):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=re.escape(fragment)) as err:
        data.load_rows(str(path), "data.train")
    assert "\n" not in str(err.value)


def test_rows_keep_their_file_line_through_the_hold_out(tmp_path):
    """A JSON array spread over lines, a BOM, and CSV records with a quoted newline: each row's origin is its
    own first line, whichever split the 5% hold-out put it in."""
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(40)]
    (tmp_path / "a.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).encode())  # 4 lines per row
    cfg = SimpleNamespace(train=str(tmp_path / "a.json"), eval=None, train_split="train", eval_split="test",
                          subset=None, num_train=10, num_eval=10, eval_limit=200)
    train, held_out = data.stage_rows(cfg, "sft", seed=0)
    assert len(held_out) == 2
    for row in train + held_out:
        i = int(row["prompt"][1:])
        assert row.origin == f"data.train: {tmp_path / 'a.json'} line {2 + 4 * i}"
    (tmp_path / "b.csv").write_text('prompt,completion\n"two\nlines",a\n\nq,b\n')
    loaded = data.load_rows(str(tmp_path / "b.csv"), "data.eval")
    assert [r.origin.rsplit(" ", 1)[1] for r in loaded] == ["2", "5"] and loaded[0]["prompt"] == "two\nlines"


def test_chat_rows_without_a_chat_template_fail_in_one_line(tok):
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="need a chat template"):
        data.split_sft_row(plain, {"messages": [USER, ANSWER]}, 0, "data.train")
