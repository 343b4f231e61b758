"""Real checkpoint layouts (issue 15): Qwen2.5, Llama 3 and Gemma model directories built in the tests
(tests/layouts.py: trained tokenizers with the real special tokens and chat templates, the real
architectures and vocabulary sizes, tiny hidden sizes) through tokenization, generation and the
three stages with conversational data.

    .venv/bin/pytest -q tests/test_layouts.py                 # tokenization, labels, generation (~20 s)
    .venv/bin/pytest -q -m slow tests/test_layouts.py         # each layout through sft -> train-rm -> rl (~90 s)
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from helpers import read_metrics, write_jsonl
from layouts import END_OF_TURN, LAYOUTS, build_layout, chat_rows
from rlhf_cli import data
from rlhf_cli.engines.rollout import SamplingParams, make_engine
from rlhf_cli.models import load_causal_lm, load_tokenizer, stop_token_ids
from rlhf_cli.models.scoring import scoring_ids

NAMES = list(LAYOUTS)


@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: build_layout(name, root / name) for name in NAMES}


def test_the_fixtures_have_the_traps_of_the_real_checkpoints(layout_dirs):
    """What makes these layouts hard is really there: no pad and a list of EOS ids (Llama 3), a tokenizer
    that adds BOS before a template that writes it (Llama 3, Gemma), a vocabulary padded past the tokenizer
    (all three), a template that injects a system turn (Qwen) or refuses one (Gemma)."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizers = {n: AutoTokenizer.from_pretrained(layout_dirs[n]) for n in NAMES}
    configs = {n: AutoConfig.from_pretrained(layout_dirs[n]) for n in NAMES}
    llama = tokenizers["llama3"]
    assert llama.pad_token is None and isinstance(configs["llama3"].eos_token_id, list)
    for name in ("llama3", "gemma"):
        tok = tokenizers[name]
        rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2  # the doubled-BOS trap
    assert all(configs[n].vocab_size > len(tokenizers[n]) for n in NAMES)
    assert (configs["qwen2.5"].vocab_size, configs["llama3"].vocab_size, configs["gemma"].vocab_size) == (151936, 128256, 256000)
    assert "You are Qwen" in tokenizers["qwen2.5"].apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with pytest.raises(Exception, match="System role not supported"):
        tokenizers["gemma"].apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    assert configs["gemma"].tie_word_embeddings and not configs["llama3"].tie_word_embeddings


@pytest.mark.parametrize("name", NAMES)
def test_every_sequence_starts_with_exactly_one_bos(layout_dirs, name):
    """Chat prompts (their template writes BOS), plain-text prompts (the tokenizer's BOS) and the
    reward model's prompt + response: one BOS at the start, none elsewhere; Qwen uses none."""
    tok = load_tokenizer(str(layout_dirs[name]), "model.path")
    bos = tok.bos_token_id if name != "qwen2.5" else None
    prompts = [data.prompt_text(tok, row, i, "data.train") for i, row in enumerate(chat_rows("prompts", 4))]
    sft = data.tokenize_sft(tok, chat_rows("sft", 4), 512, "data.train", stop_token_ids(tok, layout_dirs[name]))[0]
    sequences = ([data.encode_prompt(tok, p) for p in prompts + ["Start at 3. add 1.\n"]]
                 + [ex.prompt_ids + ex.completion_ids for ex in sft]
                 + [scoring_ids(tok, prompts[0], "3+1=4. Answer: 4")])
    for ids in sequences:
        if bos is None:
            assert tok.convert_ids_to_tokens(ids[0]) in ("<|im_start|>", "Start"), tok.decode(ids)
            assert tok.convert_tokens_to_ids("<|endoftext|>") not in ids
        else:
            assert ids[0] == bos and ids.count(bos) == 1, tok.convert_ids_to_tokens(ids[:4])
    long_prompt = data.encode_prompt(tok, prompts[0] * 4)
    cut = data.cut_left(long_prompt, 10, tok)
    assert len(cut) == 10 and (bos is None or cut[0] == bos) and cut[-3:] == long_prompt[-3:]


@pytest.mark.parametrize("name", NAMES)
def test_sft_labels_are_the_assistant_turn_with_its_end_of_turn_token(layout_dirs, name):
    """The loss covers the assistant's reply and the token that ends its turn (what generation stops on),
    nothing of the prompt, and no padding, even where the pad token IS that end-of-turn token (Llama 3)."""
    tok = load_tokenizer(str(layout_dirs[name]), "model.path")
    rows = chat_rows("sft", 6)
    examples, _ = data.tokenize_sft(tok, rows, 512, "data.train", stop_token_ids(tok, layout_dirs[name]))
    end = tok.convert_tokens_to_ids(END_OF_TURN[name])
    for ex, row in zip(examples, rows):
        assert ex.completion_ids[-1] == end and ex.completion_ids.count(end) == 1
        assert tok.decode(ex.completion_ids[:-1]) == row["messages"][-1]["content"]
    batch = data.padded_batch(examples, tok.pad_token_id)
    for r, ex in enumerate(examples):
        labelled = batch["labels"][r][batch["labels"][r] != -100].tolist()
        assert labelled == ex.completion_ids  # the turn and its end, exactly
        assert int(batch["attention_mask"][r].sum()) == ex.length  # padding (maybe the same id) is masked out
        assert (batch["labels"][r][ex.length:] == -100).all()
    if name == "llama3":
        assert tok.pad_token_id == end  # no pad token: EOS pads, masks from lengths keep them apart


@pytest.mark.parametrize("name", NAMES)
def test_generation_stops_on_any_stop_id_and_draws_only_real_tokens(layout_dirs, name):
    """The engine stops a row on any id of the generation config's eos list (not only the tokenizer's
    EOS), never draws an id of the padded vocabulary (the random model puts almost all its mass there),
    and writes padding only after the stop token."""
    path = str(layout_dirs[name])
    tok = load_tokenizer(path, "policy.path")
    model = load_causal_lm(path, "policy.path")
    stops = stop_token_ids(tok, path)
    prompt = data.encode_prompt(tok, data.prompt_text(tok, chat_rows("prompts", 1)[0], 0, "data.train"))
    ids, mask = data.left_pad([prompt] * 32, tok.pad_token_id)
    rollout = make_engine("auto", model, tok).generate(ids, mask, SamplingParams(120, noise_key=(0, 0, 0)))
    assert int(rollout.response_ids.max()) < len(tok) < model.config.vocab_size
    ended_on = set()
    for row, row_mask, stopped in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist(),
                                      rollout.stopped.tolist()):
        n = int(sum(row_mask))
        inside, after = row[:n], row[n:]
        assert not set(inside[:-1]) & set(stops)  # nothing stops a row before its last token
        assert stopped == (inside[-1] in stops)
        if stopped:
            ended_on.add(inside[-1])
        else:
            assert n == rollout.response_ids.shape[1]
        assert all(t == tok.pad_token_id for t in after)
        assert tok.pad_token_id not in inside[:-1]
    assert len(ended_on) >= 2 and ended_on - {tok.eos_token_id}, ended_on  # stopped on the config's other ids too


def _write_chat_data(d):
    return {"sft": write_jsonl(d / "sft.jsonl", chat_rows("sft", 24)),
            "sft_eval": write_jsonl(d / "sft_eval.jsonl", chat_rows("sft", 4, split="eval")),
            "pairs": write_jsonl(d / "pairs.jsonl", chat_rows("pairs", 24)),
            "pairs_eval": write_jsonl(d / "pairs_eval.jsonl", chat_rows("pairs", 4, split="eval")),
            "prompts": write_jsonl(d / "prompts.jsonl", chat_rows("prompts", 16)),
            "prompts_eval": write_jsonl(d / "prompts_eval.jsonl", chat_rows("prompts", 4, split="eval"))}


@pytest.mark.slow  # three subprocesses a layout: 25-35 s each on 2 shared cores (make test-slow)
@pytest.mark.parametrize("name", NAMES)
def test_layout_through_sft_train_rm_and_rl(layout_dirs, tmp_path, name):
    """sft -> train-rm -> rl (PPO: reference, reward model, critic) on conversational data: each stage
    runs, the reward model's config holds one pad id (the tokenizer's, never the list of EOS ids), RL's
    responses fit rollout.max_new_tokens, and the final policy keeps the layout's tied or untied head."""
    from transformers import AutoModelForCausalLM

    files = _write_chat_data(tmp_path)
    common = ["device=cpu", "device.threads=1", "max_steps=2", "eval.every=1000", "log_every=1", "optim.warmup_steps=0"]
    sft = run_cli("sft", f"model.path={layout_dirs[name]}", f"data.train={files['sft']}", f"data.eval={files['sft_eval']}",
                  "output_dir=sft", "batch_size=4", "model.max_length=96", "eval.max_new_tokens=8", "eval.rule=null",
                  *common, cwd=tmp_path)
    assert sft.returncode == 0, sft.stdout + sft.stderr
    rm = run_cli("train-rm", "model.path=sft/final", f"data.train={files['pairs']}", f"data.eval={files['pairs_eval']}",
                 "output_dir=rm", "batch_size=4", "model.max_length=96", *common, cwd=tmp_path)
    assert rm.returncode == 0, rm.stdout + rm.stderr
    tok = load_tokenizer(str(tmp_path / "sft" / "final"), "model.path")
    rm_config = json.loads((tmp_path / "rm" / "final" / "config.json").read_text())
    assert rm_config["pad_token_id"] == tok.pad_token_id
    rl = run_cli("rl", "algorithm=ppo", "algorithm.minibatches=1", "algorithm.epochs=1", "policy.path=sft/final",
                 "reward=rule_rm", "reward.model.path=rm/final", f"data.train={files['prompts']}",
                 f"data.eval={files['prompts_eval']}", "output_dir=rl", "rollout.prompts_per_step=2",
                 "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12", "eval.max_new_tokens=8",
                 "policy.max_length=96", *common, cwd=tmp_path)
    assert rl.returncode == 0, rl.stdout + rl.stderr
    train = read_metrics(tmp_path / "rl", "train")
    assert len(train) == 2
    assert all(0 < m["response_len"] <= 12 and math.isfinite(m["loss"]) and math.isfinite(m["kl"]) for m in train)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "rl" / "final")
    assert final.config.vocab_size == LAYOUTS[name]["vocab_size"]
    tied = final.get_output_embeddings().weight.data_ptr() == final.get_input_embeddings().weight.data_ptr()
    assert tied == LAYOUTS[name]["tie"]
    assert torch.isfinite(final.get_output_embeddings().weight).all()


def test_a_template_that_refuses_the_messages_names_the_row_and_the_fix(layout_dirs):
    """Gemma's template has no system role: a row with one is a DataError (one `error:` line from the CLI,
    raised while the rows are tokenized, before any weights load) naming the row and the fix, not a jinja
    traceback."""
    from rlhf_cli.errors import DataError

    tok = load_tokenizer(str(layout_dirs["gemma"]), "model.path")
    row = chat_rows("sft", 1)[0]
    row = {"messages": [{"role": "system", "content": "Be brief."}, *row["messages"]]}
    with pytest.raises(DataError, match=r"data.train: row 0: the model's chat template refused these messages "
                                        r"\(System role not supported\); fix the conversation .* first user turn"):
        data.tokenize_sft(tok, [row], 96, "data.train")
    with pytest.raises(DataError, match="System role not supported"):
        data.prompt_text(tok, {"messages": row["messages"][:2]}, 0, "data.train")
