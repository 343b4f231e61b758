"""Each stage on the real pretrained checkpoint, SmolLM2-135M-Instruct (`make pretrained`), a few steps each:
the path every user takes. Learning on it is a suite figure (docs/suite-pretrained.md), not a test; these check
that the stages run on a real 49,152-token chat model with the pretrained defaults, in micro-batches, and
leave it sane."""

from __future__ import annotations

import json
import random

import pytest

from conftest import run_cli
from helpers import read_metrics, write_jsonl
from pretrained import smollm2_dir
from rlhf_cli.config import origin

ONE_THREAD = ["device=cpu", "device.threads=1"]
RULE = "chat_sum_rule:correct"
SUM_REWARD = "rlhf_cli.tasks.pretrained.chatsum:reward"  # 1 for the number or the equation, 0.25 a right sum in words


@pytest.fixture(scope="module")
def chat_sums(tmp_path_factory):
    """2-digit sums as chat rows (SFT demonstrations, preference pairs, prompts) and their exact-match rule."""
    root = tmp_path_factory.mktemp("chat_sums")
    rng = random.Random(0)
    problems = [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(40)]

    def ask(a, b):
        return [{"role": "user", "content": f"What is {a} + {b}? Answer with just the number."}]

    write_jsonl(root / "sft.jsonl", [{"messages": ask(a, b) + [{"role": "assistant", "content": str(a + b)}],
                                      "answer": str(a + b)} for a, b in problems])
    write_jsonl(root / "pairs_eval.jsonl", [{"prompt": ask(a, b), "chosen": str(a + b), "rejected": str(a + b + 10)}
                                             for a, b in problems[:8]])
    write_jsonl(root / "pairs.jsonl", [{"prompt": ask(a, b), "chosen": str(a + b), "rejected": str(a + b + 10),
                                        "answer": str(a + b)} for a, b in problems])
    write_jsonl(root / "prompts.jsonl", [{"prompt": ask(a, b), "answer": str(a + b)} for a, b in problems])
    (root / "chat_sum_rule.py").write_text(
        "def correct(prompt, response, answer=None, **row):\n"
        "    return float(response.strip().rstrip('.') == str(answer))\n")
    return root


def _out(proc) -> str:
    return proc.stdout + proc.stderr


def test_sft_on_the_real_checkpoint(chat_sums, tmp_path):
    from transformers import AutoModelForCausalLM

    model = smollm2_dir()
    proc = run_cli("sft", f"model.path={model}", f"output_dir={tmp_path / 'sft'}", f"data.train={chat_sums / 'sft.jsonl'}",
                   f"data.eval={chat_sums / 'sft.jsonl'}", "data.eval_limit=8", "batch_size=8", "max_steps=2",
                   "eval.max_new_tokens=6", f"eval.rule={RULE}", *ONE_THREAD, cwd=chat_sums)
    assert proc.returncode == 0, _out(proc)
    assert "optim.lr=2e-05: the defaults for a pretrained model" in _out(proc)  # not the from-scratch 6e-3
    assert "micro-batches of at most" in _out(proc)
    manifest = json.loads((tmp_path / "sft" / "final" / "manifest.json").read_text())
    assert manifest["config"]["optim"]["lr"] == 2e-5
    # two steps at the pretrained rate: the held-out loss falls and stays that of a language model
    before, after = manifest["metrics_before"]["eval_loss"], manifest["metrics"]["eval_loss"]
    assert after < before < 5, (before, after)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    assert reloaded.config.vocab_size == 49152


def test_train_rm_on_the_real_checkpoint(chat_sums, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = smollm2_dir()
    proc = run_cli("train-rm", f"model.path={model}", f"output_dir={tmp_path / 'rm'}",
                   f"data.train={chat_sums / 'pairs.jsonl'}", f"data.eval={chat_sums / 'pairs_eval.jsonl'}", "batch_size=4",
                   "max_steps=2", *ONE_THREAD, cwd=chat_sums)
    assert proc.returncode == 0, _out(proc)
    assert "optim.lr=1e-05: the defaults for a pretrained model" in _out(proc)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert rm.config.num_labels == 1
    manifest = json.loads((tmp_path / "rm" / "final" / "manifest.json").read_text())
    assert 0 <= manifest["eval_accuracy"] <= 1 and manifest["score_std"] > 0


def test_dpo_on_the_real_checkpoint(chat_sums, tmp_path):
    from transformers import AutoModelForCausalLM

    model = smollm2_dir()
    proc = run_cli("dpo", f"model.path={model}", f"output_dir={tmp_path / 'dpo'}", f"data.train={chat_sums / 'pairs_eval.jsonl'}",
                   f"data.eval={chat_sums / 'pairs.jsonl'}", "data.eval_limit=4", "eval.max_new_tokens=6",
                   f"eval.rule={RULE}", "batch_size=4", "max_steps=2", "log_every=1", *ONE_THREAD, cwd=chat_sums)
    assert proc.returncode == 0, _out(proc)
    lr, sft_weight = (origin.BY_ORIGIN["dpo"][k][1] for k in ("optim.lr", "sft_weight"))
    assert f"dpo: optim.lr={lr:g}, sft_weight={sft_weight:g}: the defaults for a pretrained model" in _out(proc)
    assert "reference log-probs of 12 pairs computed" in _out(proc) and "micro-batches of at most" in _out(proc)
    train = read_metrics(tmp_path / "dpo", "train")
    # step 1: the policy is its reference, so the loss is log 2 up to the rounding of another batching
    assert abs(train[0]["pref_loss"] - 0.6931) < 1e-3 and train[0]["grad_norm"] > 0, train
    # the chosen responses' per-token log-prob moves a little after an update at the pretrained rate, no wreck
    assert abs(train[1]["logp_chosen"] - train[0]["logp_chosen"]) < 0.5, train
    manifest = json.loads((tmp_path / "dpo" / "final" / "manifest.json").read_text())
    assert manifest["metrics_before"]["eval_pair_accuracy"] == 0.5 and 0 <= manifest["metrics"]["eval_accuracy"] <= 1
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "final").config.vocab_size == 49152


def test_rl_on_the_real_checkpoint_keeps_the_model_near_its_reference(chat_sums, tmp_path):
    model = smollm2_dir()
    proc = run_cli("rl", f"policy.path={model}", f"output_dir={tmp_path / 'rl'}",
                   f"data.train={chat_sums / 'prompts.jsonl'}", f"data.eval={chat_sums / 'prompts.jsonl'}",
                   "data.eval_limit=4", "eval.max_new_tokens=6", f"reward.functions=[{SUM_REWARD}]", f"eval.rule={RULE}",
                   "rollout.prompts_per_step=2", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=12",
                   "max_steps=2", "log_every=1", "algorithm.dynamic_sampling=false", *ONE_THREAD, cwd=chat_sums)
    assert proc.returncode == 0, _out(proc)
    # not 3e-4, which wrecks it; bf16 autocast where this CPU multiplies in bf16 (fp32 master weights)
    took = "optim.lr=1e-05" + (", device.autocast=bf16" if origin.cpu_has_bf16() else "")
    assert f"rl: {took}: the defaults for a pretrained model" in _out(proc)
    train = [m for m in read_metrics(tmp_path / "rl") if m["kind"] == "train"]
    assert len(train) == 2
    # the base model writes "47 + 38 = 85": chatsum's reward gives a right sum some credit, so groups differ
    # and the first step really updates (with an exact-number rule every reward was 0 and nothing moved)
    assert train[0]["grad_norm"] > 0, train
    assert all(abs(m["kl"]) < 0.5 for m in train), [m["kl"] for m in train]  # no collapse after an update
    assert (tmp_path / "rl" / "final" / "model.safetensors").exists()


def test_eval_on_the_real_checkpoint(chat_sums, tmp_path):
    model = smollm2_dir()
    proc = run_cli("eval", str(model), f"data.eval={chat_sums / 'prompts.jsonl'}", "data.eval_limit=6",
                   "eval.max_new_tokens=24", f"eval.rule={RULE}", *ONE_THREAD, "--json", str(tmp_path / "eval.json"),
                   cwd=chat_sums)
    assert proc.returncode == 0, _out(proc)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["metrics"]["prompts"] == 6 and 0 <= result["metrics"]["accuracy"] <= 1
    generations = result["generations"]
    assert len(generations) == 6 and all(g["response"].strip() for g in generations)
    # the real model's habit (what RL has to change): it works the sum out in words, and some answers stop
    # before the token limit ("71 + 55 = 226")
    assert min(len(g["response"]) for g in generations) < 40 and result["metrics"]["response_tokens"] <= 24
