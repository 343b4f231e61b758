"""The real-model task suite (rlhf_cli/tasks/pretrained): files, held-out separation, rules, short prompts. No model
runs; the SmolLM2 tokenizer is read when models/SmolLM2-135M-Instruct is there (else a word-count bound)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rlhf_cli import data
from rlhf_cli.errors import UserError
from rlhf_cli.rewards import call_reward, import_reward_function
from rlhf_cli.tasks.base import rows, write
from rlhf_cli.tasks.pretrained import HELD_OUT, RM_ONLY, TASKS, TUNING

FILES = ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "prompts_train", "prompts_eval")
SMOLLM2 = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct"
MAX_PROMPT_TOKENS = 50  # rendered: the template's default system turn and headers are 30 of them
MAX_PROMPT_WORDS = 14  # the user's text, when the tokenizer is not there


def _user_text(row: dict) -> str:
    messages = row["messages"] if "messages" in row else row["prompt"]
    assert isinstance(messages, list) and messages[0]["role"] == "user"
    return messages[0]["content"]


def test_three_chat_tasks_one_held_out_one_rm_only():
    assert set(TASKS) == {"chatsum", "wordlimit", "politeness"}
    assert set(TUNING) | set(HELD_OUT) == set(TASKS) and not set(TUNING) & set(HELD_OUT) and len(HELD_OUT) == 1
    assert all(t.chat for t in TASKS.values()) and set(RM_ONLY) == {"politeness"}
    for t in TASKS.values():
        assert (t.n_sft, t.n_pairs, t.n_prompts, t.n_eval) == (1000, 2000, 500, 100)


@pytest.mark.parametrize("name", list(TASKS))
def test_six_files_and_held_out_prompts_never_train(tmp_path, name):
    task = TASKS[name]
    d = write(task, tmp_path / name)
    loaded = {f: data.load_rows(str(d / f"{f}.jsonl"), "data.train") for f in FILES}
    assert {f: len(r) for f, r in loaded.items()} == {
        "sft_train": 1000, "sft_eval": 100, "pairs_train": 2000, "pairs_eval": 100, "prompts_train": 500,
        "prompts_eval": 100}
    held = {_user_text(r) for r in loaded["prompts_eval"]}
    assert len(held) == 100  # distinct
    assert held == {_user_text(r) for r in loaded["sft_eval"]} == {_user_text(r) for r in loaded["pairs_eval"]}
    for f in ("sft_train", "pairs_train", "prompts_train"):
        train = {_user_text(r) for r in loaded[f]}
        assert not held & train, f
        assert len(train) >= 50, f  # training prompts vary too
    assert rows(task, seed=0) == rows(task, seed=0) and rows(task, seed=1) != rows(task, seed=0)


@pytest.mark.parametrize("name", list(TASKS))
def test_rules_score_gold_one_and_rejected_lower(name):
    task = TASKS[name]
    correct = import_reward_function(task.correct)
    reward = None if name in RM_ONLY else import_reward_function(task.reward)
    rng = random.Random(0)
    demo_right = 0
    for _ in range(300):
        prob = task.problem(rng)
        gold, rejected = task.gold(prob), task.wrong(prob, rng)
        row = {"answer": prob["answer"]}
        assert correct(prob["prompt"], gold, **row) == 1.0, (prob["prompt"], gold)
        assert correct(prob["prompt"], rejected, **row) == 0.0, (prob["prompt"], rejected)
        if reward is not None:
            assert call_reward(reward, task.reward, prob["prompt"], gold, row) == 1.0
            assert call_reward(reward, task.reward, prob["prompt"], rejected, row) < 1.0
        demo_right += correct(prob["prompt"], task.demo(prob, rng), **row)
    assert 0.3 <= demo_right / 300 <= 0.85, demo_right  # the demonstrator is flawed by design, not useless


def test_rules_on_the_model_s_own_kinds_of_answer():
    chatsum = import_reward_function(TASKS["chatsum"].correct)
    chatsum_reward = import_reward_function(TASKS["chatsum"].reward)
    prompt = "What is 47 + 38? Answer with just the number."
    for text, right in [("85", 1), (" 85.\n", 1), ("47 + 38 = 85", 1), ("47+38=85.", 1), ("85!", 0),
                        ("The sum of 47 and 38 is 85.", 0), ("47 + 38 = 75", 0), ("38 + 47 = 85 because", 0),
                        ("12 + 73 = 85", 0), ("75", 0)]:
        assert chatsum(prompt, text, answer="85") == right, text
    assert chatsum_reward(prompt, "The sum of 47 and 38 is 85.", answer="85") == 0.25  # partial credit, documented
    assert chatsum_reward(prompt, "The sum is 75.", answer="85") == 0.0
    wordlimit = import_reward_function(TASKS["wordlimit"].correct)
    spec = "3 fruits, at most 4 words"
    for text, right in [("apple, banana, cherry", 1), ("Apples, bananas and cherries.", 1),
                        ("apple, banana, cherry, plum", 0), ("apple, banana", 0), ("apple, apple, banana", 0),
                        ("Here are three fruits: apple, banana, cherry.", 0), ("apple, banana, red", 0),
                        ("the apple, a banana and a cherry", 0)]:  # the last: 7 words
        assert wordlimit("", text, answer=spec) == right, text
    politeness = import_reward_function(TASKS["politeness"].correct)
    for text, right in [("The capital of France is Paris. Would you like to know more about France?", 1),
                        ("Paris is the capital. Shall I share a fun fact?", 1), ("Paris.", 0),
                        ("The capital of France is Paris.", 0), ("Would you like to know? It is Paris.", 0),
                        ("The capital of France is Paris. It is lovely. Would you like more?", 0),
                        ("Great question! The capital of France is Paris. Would you like more details?", 0)]:
        assert politeness("", text, answer="Paris") == right, text


def test_the_rm_only_task_has_no_rule_reward():
    with pytest.raises(UserError, match="not callable"):
        import_reward_function(TASKS["politeness"].reward)


def test_rendered_prompts_are_short():
    prompts = [_user_text(r) for t in TASKS.values() for f in ("prompts_eval", "prompts_train")
               for r in rows(t)[f]]
    if (SMOLLM2 / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(SMOLLM2)
        lengths = [len(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False).input_ids)
                   for p in set(prompts)]
        assert max(lengths) <= MAX_PROMPT_TOKENS, max(lengths)
    else:
        assert max(len(p.split()) for p in prompts) <= MAX_PROMPT_WORDS


def test_general_chat_set_is_messages_rows():
    path = Path(__file__).resolve().parents[2] / "rlhf_cli" / "tasks" / "pretrained" / "general.jsonl"
    general = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(general) >= 30
    for row in general:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and "assistant" in roles and all(m["content"].strip() for m in row["messages"])
