"""`rlhf train-rm` end to end on the tiny model: learning, plain-transformers reload, score
position under any padding, resume identity, and bad inputs as one table."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli, run_cli_together
from helpers import QUICK_RM as QUICK
from helpers import write_jsonl as _write_jsonl
from rlhf_cli import data, task
from rlhf_cli.errors import DataError
from rlhf_cli.models import load_scalar_head_model, load_tokenizer, scalar_head
from rlhf_cli.models.embedded import build_tokenizer
from rlhf_cli.models.logprobs import token_values
from rlhf_cli.models.scoring import last_token_scores, pad_right, score_texts, scoring_ids
from rlhf_cli.stages.train_rm import pair_batch, tokenize_pairs


def _random_head_model(model_dir):
    """The tiny model as a reward model whose head is random (a fresh head scores 0 everywhere)."""
    model = load_scalar_head_model(str(model_dir), "model.path")
    with torch.no_grad():
        scalar_head(model).weight.copy_(torch.randn(scalar_head(model).weight.shape, generator=torch.Generator().manual_seed(0)))
    return model.eval()


# ---------------------------------------------------------------- scores and batches


def test_score_is_read_at_the_last_token_under_left_and_right_padding(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), "model.path")
    model = _random_head_model(tiny_model_dir)
    texts = [("Solve mod 10: 7+2-3+1\n", "7+2=9. 9-3=6. 6+1=7. Answer: 7"), ("Solve mod 10: 1+1\n", "1+1=2. Answer: 2"),
             ("Q\n", "A")]
    seqs = [scoring_ids(tok, p, r) for p, r in texts]
    assert all(s == data.encode(tok, p + r) for s, (p, r) in zip(seqs, texts)) and len({len(s) for s in seqs}) == 3
    with torch.no_grad():
        right = last_token_scores(model, *pad_right(seqs, tok.pad_token_id))
        left = last_token_scores(model, *data.left_pad(seqs, tok.pad_token_id))
        alone = torch.cat([last_token_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        ids, mask = pad_right(seqs, tok.pad_token_id)
        at_eos = token_values(model, ids, mask)[torch.arange(3), torch.tensor([len(s) - 1 for s in seqs])]
    assert right.std() > 1e-3  # a random head: the comparison is not vacuous
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at_eos, right)
    # the public helper scores the same sequences in the same place
    torch.testing.assert_close(score_texts(model, tok, *zip(*texts), "cpu", batch_size=2), right, atol=1e-5, rtol=1e-5)


def test_pairs_tokenize_as_whole_text_with_margins_and_a_drop_count():
    tok = build_tokenizer()
    rows = [{"prompt": "P\n", "chosen": "good", "rejected": "bad", "margin": 1.5},
            {"prompt": "P\n", "chosen": "a much longer chosen response " * 4, "rejected": "x"},
            # TRL's conversational formats: explicit prompt with message lists, and implicit prompt
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]},
            {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    pairs, dropped = tokenize_pairs(tok, rows, 40, "data.train", use_margin=True)
    assert dropped == 1 and len(pairs) == 3  # the long pair is dropped, never cut
    assert [p.margin for p in pairs] == [1.5, 0.0, 0.0]
    assert pairs[0].chosen_ids == data.encode(tok, "P\ngood")  # the text a client scores, nothing appended
    assert pairs[1].prompt == pairs[2].prompt == "<|user|>hi\n<|assistant|>"
    assert pairs[1].chosen_ids == data.encode(tok, "<|user|>hi\n<|assistant|>yes")
    assert tokenize_pairs(tok, rows[:1], 40, "data.train", use_margin=False)[0][0].margin == 0.0
    batch = pair_batch(pairs, tok.pad_token_id)  # chosen rows, then rejected rows, one batch
    assert batch["input_ids"].shape[0] == 6 and batch["margin"].tolist() == [1.5, 0.0, 0.0]
    assert batch["attention_mask"][3].sum() == len(data.encode(tok, "P\nbad"))
    with pytest.raises(DataError, match="not a number"):
        tokenize_pairs(tok, [{**rows[0], "margin": "big"}], 40, "data.train", use_margin=True)


# ---------------------------------------------------------------- the CLI end to end


def test_train_rm_beats_chance_and_final_reloads_with_plain_transformers(tmp_path, sft_run):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "rm"
    proc = run_cli("train-rm", f"output_dir={run}", f"model.path={sft_run / 'final'}", "max_steps=250", "data.num_train=2000", "data.num_eval=100",
                   "batch_size=16", "eval.every=125", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = run / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["stage"] == "train-rm" and manifest["steps"] == 250 and manifest["data_fingerprint"]
    assert manifest["metrics_before"]["eval_accuracy"] == 0.5  # a fresh head scores every response 0
    assert manifest["metrics"]["eval_accuracy"] >= 0.7, manifest["metrics"]  # chance is 0.5
    assert manifest["eval_accuracy"] == manifest["metrics"]["eval_accuracy"]
    assert manifest["score_std"] > 0 and manifest["score_mean"] == manifest["metrics"]["eval_score_mean"]

    # plain transformers: one output, and the same score as our last_token_scores on right-padded batches
    hf = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert hf.config.num_labels == 1 and hf.config.architectures[0].endswith("ForSequenceClassification")
    tok = load_tokenizer(str(final), "model.path")
    rows = task.preference_rows(100, seed=0, split="eval", n_eval=100)
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    ours = score_texts(load_scalar_head_model(str(final), "model.path"), tok, prompts, responses, "cpu", batch_size=64)
    ids, mask = pad_right([scoring_ids(tok, p, r) for p, r in zip(prompts, responses)], tok.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours_left = last_token_scores(hf, *data.left_pad([scoring_ids(tok, p, r) for p, r in zip(prompts, responses)],
                                                         tok.pad_token_id))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_left, ours, atol=1e-4, rtol=1e-4)
    # any client: its own tokenizer on prompt + response, the one logit (no EOS to append, nothing to know)
    from transformers import AutoTokenizer

    client_tok = AutoTokenizer.from_pretrained(final)
    with torch.no_grad():
        alone = torch.stack([hf(**client_tok(p + r, return_tensors="pt")).logits[0, 0]
                             for p, r in list(zip(prompts, responses))[::20]])
        # TRL's reward functions (GRPOTrainer): right-padded batch, add_special_tokens=False, logits[:, 0]
        trl_inputs = client_tok(text=[p + r for p, r in zip(prompts, responses)], return_tensors="pt", padding=True,
                                padding_side="right", add_special_tokens=False)
        trl_scores = hf(**trl_inputs).logits[:, 0]
    torch.testing.assert_close(alone, ours[::20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(trl_scores, ours, atol=1e-4, rtol=1e-4)
    # the manifest's accuracy and score statistics are those of these held-out pairs
    gap = ours[:100] - ours[100:]
    assert manifest["eval_accuracy"] == pytest.approx(float((gap > 0).float().mean() + 0.5 * (gap == 0).float().mean()))
    assert manifest["score_mean"] == pytest.approx(float(ours.mean()), abs=1e-4)
    assert manifest["score_std"] == pytest.approx(float(ours.std()), abs=1e-4)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "eval"] == [0, 125, 250]


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_resume_gives_identical_weights_and_drops_are_counted(tmp_path):
    # the cosine horizon is max_steps, so QUICK's constant schedule makes N-then-2N comparable to 2N
    rows = task.preference_rows(64)
    rows += [{**r, "prompt": r["prompt"] * 3} for r in rows[:8]]  # 8 pairs longer than 80 tokens
    train = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = [*QUICK, "checkpoint.every=3", "model.max_length=80", f"data.train={train}"]
    straight = run_cli("train-rm", f"output_dir={tmp_path / 'straight'}", "max_steps=6", *args, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    out = straight.stdout + straight.stderr
    assert "8" in out and "dropped" in out and "model.max_length=80" in out, out
    first = run_cli("train-rm", f"output_dir={tmp_path / 'resumed'}", "max_steps=3", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_cli("train-rm", f"output_dir={tmp_path / 'resumed'}", "max_steps=6", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "resuming at step 3" in second.stdout + second.stderr
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    initial = load_file(tmp_path / "resumed" / "base" / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # it trained
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    good = task.preference_rows(8)
    not_a_model = tmp_path / "vit"
    build_tokenizer().save_pretrained(not_a_model)
    (not_a_model / "config.json").write_text(json.dumps({"model_type": "vit"}))
    table = {  # input -> message fragment; every case exits 2 with one line and no traceback
        "no rejected": ([f"data.train={_write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'p', 'chosen': 'c'}] * 4)}"],
                        "has no rejected"),
        "identical": ([f"data.train={_write_jsonl(tmp_path / 'b.jsonl', [{**r, 'rejected': r['chosen']} for r in good])}"],
                      "identical chosen and rejected"),
        "bad margin": ([f"data.train={_write_jsonl(tmp_path / 'c.jsonl', [{**r, 'margin': 'x'} for r in good])}"],
                       "not a number"),
        "all too long": (["model.max_length=16"], "none of its"),
        "not a causal LM": ([f"model.path={not_a_model}"], "does not load as a causal LM or sequence classifier"),
        "no model dir": ([f"model.path={tmp_path / 'nowhere'}"], "does not exist"),
    }
    results = run_cli_together({name: ["train-rm", f"output_dir={tmp_path / name}", "data.num_train=32",
                                       "data.num_eval=8", *args] for name, (args, _) in table.items()}, cwd=tmp_path)
    for name, result in results.items():
        assert_one_line_error(result, table[name][1])


def test_a_config_with_no_pad_and_a_list_of_stop_ids_gets_an_int_pad(tmp_path):
    """Llama 3's layout (no pad token, eos_token_id a list): the reward model's pad id is one id, never the list."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=None, eos_token_id=[5, 7])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama3")
    model = load_scalar_head_model(str(tmp_path / "llama3"), "model.path")
    assert model.config.pad_token_id == 5
    ids = torch.tensor([[1, 2, 3], [4, 5, 5]])
    assert last_token_scores(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]])).shape == (2,)
