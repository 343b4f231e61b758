"""`rlhf sft` end to end on the tiny model, resume identity, loss masking and packing."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

from conftest import run_cli
from helpers import SFT_QUICK as QUICK
from helpers import read_metrics
from rlhf_cli import data, task
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.stages.sft import token_loss_sum


def test_sft_learns_the_format_and_reloads_with_plain_transformers(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = sft_run / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["steps"] == 600
    before, after = manifest["metrics_before"], manifest["metrics"]
    assert after["eval_loss"] < 0.25 * before["eval_loss"]
    assert after["eval_accuracy"] >= before["eval_accuracy"] + 0.15  # learns the format; demos are imperfect
    assert after["eval_accuracy"] <= 0.6  # ... and leaves RL room: greedy copies the demonstrator's slips
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = task.prompt_rows(1, split="eval")[0]["prompt"]
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert task.extract_answer(text) is not None, text  # the worked-answer format
    lines = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in lines) and lines[-1]["step"] == 600
    assert (sft_run / "config.json").exists() and sorted(p.name for p in (sft_run / "checkpoints").iterdir())


def test_resume_gives_identical_weights(tmp_path):
    straight = run_cli("sft", f"output_dir={tmp_path / 'straight'}", "max_steps=6", *QUICK, "checkpoint.every=3", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    first = run_cli("sft", f"output_dir={tmp_path / 'resumed'}", "max_steps=3", *QUICK, "checkpoint.every=3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("sft", f"output_dir={tmp_path / 'resumed'}", "max_steps=6", *QUICK, "checkpoint.every=3", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming at step 3" in second.stdout + second.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated or lost steps in the metrics


def test_rerun_with_a_different_config_is_refused(tmp_path):
    ok = run_cli("sft", f"output_dir={tmp_path / 'r'}", "max_steps=1", *QUICK, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    # optim.lr and max_steps are safe to change on a rerun (tests/test_guard_and_rerun.py); weight decay is not
    other = run_cli("sft", f"output_dir={tmp_path / 'r'}", "max_steps=1", *QUICK, "optim.weight_decay=0.5",
                    cwd=tmp_path)
    assert other.returncode == 2 and "optim.weight_decay" in other.stderr and "Traceback" not in other.stderr


def test_loss_is_on_completion_tokens_only(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), "model.path")
    model = load_causal_lm(str(tiny_model_dir), "model.path")
    rows = [{"prompt": "Start at 1. add 2.\n", "completion": "1+2=3. Answer: 3"},
            {"prompt": "Start at 9. sub 1. sub 1.\n", "completion": "9-1=8. 8-1=7. Answer: 7"}]
    examples, _ = data.tokenize_sft(tok, rows, 160, "data.train")
    batch = data.padded_batch(examples, tok.pad_token_id)
    loss_sum, count = token_loss_sum(model, batch, "cpu")
    expected, expected_count = 0.0, 0
    for ex in examples:  # brute force: -log p(completion token | everything before), one example at a time
        ids = torch.tensor([ex.prompt_ids + ex.completion_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t in range(len(ex.prompt_ids), ex.length):
            expected -= float(logp[t - 1, ids[0, t]])
            expected_count += 1
    assert count == expected_count == sum(len(ex.completion_ids) for ex in examples)
    assert abs(float(loss_sum) - expected) < 1e-3
    # prompt tokens carry no loss: changing them in the labels' eyes changes nothing
    assert (batch["labels"][0, : len(examples[0].prompt_ids)] == -100).all()


def test_packing_has_no_cross_example_attention(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), "model.path")
    model = load_causal_lm(str(tiny_model_dir), "model.path")
    examples, _ = data.tokenize_sft(tok, task.sft_rows(6, split="eval"), 160, "data.train")
    packed = data.packed_batch(examples, 128, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                   position_ids=packed["position_ids"]).logits
    checked = 0
    for r in range(packed["input_ids"].shape[0]):
        starts = (packed["position_ids"][r] == 0).nonzero().flatten().tolist() + [128]
        for s, e in zip(starts, starts[1:]):
            ids = packed["input_ids"][r:r + 1, s:e]
            if (ids == tok.pad_token_id).all():
                continue
            alone = model(input_ids=ids).logits
            assert torch.allclose(logits[r, s:e], alone[0], atol=1e-4)
            checked += 1
    assert checked == len(examples)
    # packed and padded batches give the same summed loss
    packed_loss, n1 = token_loss_sum(model, packed, "cpu")
    padded_loss, n2 = token_loss_sum(model, data.padded_batch(examples, tok.pad_token_id), "cpu")
    assert n1 == n2 and abs(float(packed_loss) - float(padded_loss)) < 1e-3


def test_chat_messages_rows_use_the_chat_template(tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
             "answer": r["answer"]} for r in task.sft_rows(40)]
    train = tmp_path / "chat.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("sft", f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", f"data.train={train}",
                   "max_steps=2", *QUICK[2:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(str(tiny_model_dir), "model.path")
    prompt, completion = data.split_sft_row(tok, rows[0], 0, "data.train")
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
    # the assistant turn as the template writes it, its end-of-turn token (here the EOS) included, once
    assert completion == rows[0]["messages"][1]["content"] + "<eos>"
    (example,), _ = data.tokenize_sft(tok, rows[:1], 160, "data.train")
    assert example.completion_ids.count(tok.eos_token_id) == 1 and example.completion_ids[-1] == tok.eos_token_id


def test_gradient_checkpointing_and_bf16_autocast_run(tmp_path):
    proc = run_cli("sft", f"output_dir={tmp_path / 'r'}", "max_steps=2", *QUICK, "model.gradient_checkpointing=true",
                   "device.autocast=bf16", "device=cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fp32 weights, bf16 autocast" in proc.stdout + proc.stderr
    train = read_metrics(tmp_path / "r", "train")
    # the untrained tiny model predicts nearly uniformly: cross-entropy ln(vocabulary size), bf16 or not
    vocab = json.loads((tmp_path / "r" / "base" / "config.json").read_text())["vocab_size"]
    assert [r["step"] for r in train] == [1, 2] and all(r["applied"] == 1 for r in train)
    assert abs(train[0]["loss"] - math.log(vocab)) < 0.25, (train[0]["loss"], math.log(vocab))
