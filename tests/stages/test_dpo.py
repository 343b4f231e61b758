"""`rlhf dpo` end to end on the tiny model: pairs tokenized as completions, sequence log-probs against a plain
forward, learning with the reference read back through plain transformers, the kept reference log-probs on resume,
the losses by name, and bad inputs as one line each."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli, run_cli_together
from helpers import ONE_THREAD, read_metrics, write_jsonl
from rlhf_cli import data, task
from rlhf_cli.errors import DataError
from rlhf_cli.models import load_causal_lm, load_tokenizer, stop_token_ids
from rlhf_cli.models.embedded import build_tokenizer
from rlhf_cli.stages.dpo import REFERENCE_FILE, pair_logprobs

# a few seconds a run: 64 embedded pairs, batches of 8, a constant schedule (N then 2N steps equals 2N)
QUICK = ["data.num_train=64", "data.num_eval=16", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=8",
         "log_every=1", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", *ONE_THREAD]


def plain_sequence_logprob(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """log pi(completion | prompt) from one unpadded forward of plain transformers: the sum over its tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return float(logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum())


# ---------------------------------------------------------------- pairs and their log-probs


def test_pairs_tokenize_as_completions_ending_at_the_stop_token_and_long_ones_drop():
    tok = build_tokenizer()
    rows = [{"prompt": "P\n", "chosen": "good", "rejected": "bad"},
            {"prompt": "P\n", "chosen": "a much longer chosen response " * 4, "rejected": "x"},
            {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]},
            {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    pairs, dropped = data.tokenize_preference(tok, rows, 40, "data.train")
    assert dropped == 1 and len(pairs) == 3  # the long pair is dropped, never cut
    eos = tok.eos_token_id
    assert pairs[0].chosen.prompt_ids == pairs[0].rejected.prompt_ids == data.encode_prompt(tok, "P\n")
    assert pairs[0].chosen.completion_ids == data.encode(tok, "good") + [eos]  # what sft trains on: stop included
    assert pairs[0].rejected.completion_ids == data.encode(tok, "bad") + [eos]
    # explicit and implicit conversational prompts give the same rendered prompt and completions
    assert pairs[1].chosen.prompt_ids == pairs[2].chosen.prompt_ids == data.encode_prompt(tok, "<|user|>hi\n<|assistant|>")
    assert pairs[1].chosen.completion_ids == pairs[2].chosen.completion_ids
    assert pairs[0].length == max(pairs[0].chosen.length, pairs[0].rejected.length)
    with pytest.raises(DataError, match="identical chosen and rejected"):
        data.tokenize_preference(tok, [{**rows[0], "rejected": "good"}], 40, "data.train")


def test_pair_logprobs_are_each_responses_summed_log_probs_under_right_padding(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), "model.path")
    model = load_causal_lm(str(tiny_model_dir), "model.path").eval()
    torch.manual_seed(0)
    with torch.no_grad():  # random weights: every log-prob differs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = task.preference_rows(6, seed=1)
    rows[2]["rejected"] = rows[2]["rejected"] + " and more words to make the rows unequal"
    pairs, _ = data.tokenize_preference(tok, rows, 200, "data.train", stop_token_ids(tok, str(tiny_model_dir)))
    with torch.no_grad():
        lp = pair_logprobs(model, pairs, tok.pad_token_id, "cpu")
    for i, p in enumerate(pairs):
        for side, ours, count in (("chosen", lp.chosen, lp.chosen_tokens), ("rejected", lp.rejected, lp.rejected_tokens)):
            ex = getattr(p, side)
            assert float(ours[i]) == pytest.approx(plain_sequence_logprob(model, ex.prompt_ids, ex.completion_ids),
                                                   abs=1e-4)
            assert int(count[i]) == len(ex.completion_ids)


# ---------------------------------------------------------------- the CLI end to end


def test_dpo_learns_against_the_starting_checkpoint_and_final_reloads_with_plain_transformers(tmp_path, sft_run):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "dpo"
    proc = run_cli("dpo", f"output_dir={run}", f"model.path={sft_run / 'final'}", "max_steps=40", "data.num_train=1300",
                   "data.num_eval=100", "eval.every=20", *ONE_THREAD, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "optim.lr=0.0003, sft_weight=1: the defaults for a model built from a config" in out
    assert "beta=0.1: the default for loss=sigmoid" in out and "reference log-probs of 1400 pairs computed" in out
    manifest = json.loads((run / "final" / "manifest.json").read_text())
    before, after = manifest["metrics_before"], manifest["metrics"]
    assert manifest["stage"] == "dpo" and manifest["steps"] == 40 and "beta=0.1" in manifest["derived_defaults"]
    # step 0: the policy is the reference, so every implicit reward is 0: DPO's loss log 2, every pair a tie
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and before["eval_pair_accuracy"] == 0.5
    assert after["eval_pair_accuracy"] >= 0.85 and after["eval_margin"] > 0.1, after
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.05, (before, after)  # the rule, on held-out prompts
    assert [r["step"] for r in read_metrics(run, "eval")] == [0, 20, 40]

    # plain transformers: the final/ and the starting checkpoint give the run's held-out rewards and ranking
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    start = AutoModelForCausalLM.from_pretrained(sft_run / "final").eval()
    tok = load_tokenizer(str(run / "final"), "model.path")
    rows = task.preference_rows(100, seed=0, split="eval", n_eval=100)
    pairs, _ = data.tokenize_preference(tok, rows, 160, "data.eval", stop_token_ids(tok, str(run / "final")))
    kept = load_file(run / REFERENCE_FILE)
    gaps = []
    for i, p in enumerate(pairs):
        ref = [plain_sequence_logprob(start, ex.prompt_ids, ex.completion_ids) for ex in (p.chosen, p.rejected)]
        assert ref == pytest.approx([float(kept["eval_chosen"][i]), float(kept["eval_rejected"][i])], abs=1e-4)
        pol = [plain_sequence_logprob(final, ex.prompt_ids, ex.completion_ids) for ex in (p.chosen, p.rejected)]
        gaps.append(0.1 * ((pol[0] - ref[0]) - (pol[1] - ref[1])))
    gaps = torch.tensor(gaps)
    assert after["eval_margin"] == pytest.approx(float(gaps.mean()), abs=1e-4)
    assert after["eval_pair_accuracy"] == pytest.approx(float((gaps > 0).double().mean()), abs=0.011)  # ties aside


def test_resume_reads_the_kept_reference_and_a_lost_one_is_recomputed_from_the_start(tmp_path, tiny_model_dir):
    args = [f"model.path={tiny_model_dir}", *QUICK, "checkpoint.every=2", "optim.lr=3e-3"]
    straight = run_cli("dpo", "output_dir=straight", "max_steps=6", *args, cwd=tmp_path)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    for name, lose in (("resumed", False), ("lost", True)):
        first = run_cli("dpo", f"output_dir={name}", "max_steps=3", *args, cwd=tmp_path)
        assert first.returncode == 0, first.stdout + first.stderr
        if lose:
            (tmp_path / name / REFERENCE_FILE).unlink()
        second = run_cli("dpo", f"output_dir={name}", "max_steps=6", *args, cwd=tmp_path)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out
        assert "resuming at step 3" in out
        assert ("computed from" in out) == lose and ("read from" in out) == (not lose), out
        a, b = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("straight", name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert [r["step"] for r in read_metrics(tmp_path / name, "train")] == [1, 2, 3, 4, 5, 6]
    kept = [load_file(tmp_path / r / REFERENCE_FILE) for r in ("straight", "lost")]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])  # the starting weights' log-probs, again
    initial = load_file(tmp_path / "straight" / "base" / "model.safetensors") if (tmp_path / "straight" / "base").exists() \
        else load_file(tiny_model_dir / "model.safetensors")
    final = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert not torch.equal(final["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # it trained


@pytest.mark.parametrize("loss, extra, first_loss", [
    ("sigmoid", ["label_smoothing=0.2", "sft_weight=1.0"], math.log(2)),  # cDPO at d = 0 is log 2 too
    ("ipo", ["beta=0.1"], 25.0),  # (1 / (2 beta))^2 at d = 0
    ("simpo", [], None),  # no reference: nothing to compare at step 0
])
def test_each_loss_by_name_trains_and_logs_its_terms(tmp_path, tiny_model_dir, loss, extra, first_loss):
    run = tmp_path / loss
    proc = run_cli("dpo", f"output_dir={run}", f"model.path={tiny_model_dir}", f"loss={loss}", "max_steps=2", *extra,
                   *QUICK, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    rows = read_metrics(run, "train")
    if first_loss is not None:
        assert rows[0]["pref_loss"] == pytest.approx(first_loss, rel=1e-5)
        assert (run / REFERENCE_FILE).exists()
    else:
        assert "no reference (loss=simpo is reference-free)" in out and not (run / REFERENCE_FILE).exists()
        assert "beta=2: the default for loss=simpo" in out
    if "sft_weight=1.0" in extra:  # the total is the preference loss plus the chosen responses' per-token NLL
        assert rows[0]["sft_loss"] > 0 and rows[0]["loss"] == pytest.approx(rows[0]["pref_loss"] + rows[0]["sft_loss"])
    assert json.loads((run / "final" / "manifest.json").read_text())["preference"]["loss"] == loss


def test_a_key_the_loss_does_not_read_is_said_ignored(tmp_path, tiny_model_dir):
    proc = run_cli("dpo", "output_dir=run", f"model.path={tiny_model_dir}", "gamma=1.0", "max_steps=1", *QUICK,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gamma=1.0 is ignored: it is read only with loss=simpo" in " ".join((proc.stdout + proc.stderr).split())


def test_bad_inputs_exit_2_with_one_line_before_any_weights_load(tmp_path, tiny_model_dir):
    good = task.preference_rows(8)
    garbage = tmp_path / "garbage"  # a model dir whose weights cannot load: every case must stop before them
    garbage.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (garbage / f.name).write_bytes(f.read_bytes())
    (garbage / "model.safetensors").write_bytes(b"not weights")
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    for f in garbage.iterdir():
        (rm_dir / f.name).write_bytes(f.read_bytes())
    config = json.loads((rm_dir / "config.json").read_text())
    (rm_dir / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    table = {  # input -> message fragment
        "loss typo": (["loss=dpo"], "loss='dpo'"),
        "negative beta": (["beta=-1"], "beta must be > 0"),
        "smoothing": (["label_smoothing=0.7"], "label_smoothing=0.7 must be in [0, 0.5)"),
        "no rejected": ([f"data.train={write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'p', 'chosen': 'c'}] * 4)}"],
                        "has no rejected"),
        "sft rows": ([f"data.train={write_jsonl(tmp_path / 'b.jsonl', task.sft_rows(8))}"], "has no chosen"),
        "identical": ([f"data.train={write_jsonl(tmp_path / 'c.jsonl', [{**r, 'rejected': r['chosen']} for r in good])}"],
                      "identical chosen and rejected"),
        "all too long": (["model.max_length=16", "eval.max_new_tokens=4"], "none of its"),
        "too big a batch": (["batch_size=64", "data.num_train=32"], "a step takes 64 pairs"),
        "a reward model": ([], "reward model"),
    }
    results = run_cli_together({name: ["dpo", f"output_dir={tmp_path / name}", "data.num_train=32", "data.num_eval=8",
                                       f"model.path={rm_dir if name == 'a reward model' else garbage}", *args]
                                for name, (args, _) in table.items()}, cwd=tmp_path)
    for name, result in results.items():
        assert_one_line_error(result, table[name][1])
