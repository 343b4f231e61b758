"""The RLHF loop's tools through the real CLI: `rlhf generate`, `rlhf label` (rule and rm judges),
`rlhf train-rm` continuing a reward model on several files (docs/loop.md).

    .venv/bin/pytest -q tests/cli/test_loop.py

Everything runs on the embedded tiny model as `python -m rlhf_cli` subprocesses; the labeling
page in a real browser is tested in tests/cli/test_label_page.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import permutations
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from helpers import ONE_THREAD, write_jsonl, write_text

KEEP = "unfinished=keep"  # pair responses cut at max_new_tokens too (the untrained model's run to the limit)
# 24 prompts, one per batch: a kill lands between batches; 24 tokens so responses differ in length
GEN = ["data.num_prompts=24", "samples_per_prompt=3", "max_new_tokens=24", "batch_size=1", "seed=5", *ONE_THREAD]
RULES = '''
def length(prompt, response, **row):
    """Longer is better: the tiny untrained model's responses differ in length."""
    return float(len(response))

def words(prompt, response, **row):
    return "not a number"
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loop")
    write_text(root / "rules" / "looprules.py", RULES)
    return root


def cli(*args, cwd: Path):
    return run_cli(*args, cwd=cwd, env={"PYTHONPATH": str(cwd / "rules")})


@pytest.fixture(scope="module")
def gens(root, tiny_model_dir) -> Path:
    """An uninterrupted `rlhf generate`: the file every resumed run must reproduce."""
    proc = cli("generate", f"model.path={tiny_model_dir}", f"output={root / 'gens.jsonl'}", *GEN, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "gens.jsonl"


@pytest.fixture(scope="module")
def reward_model(root, tiny_model_dir) -> Path:
    proc = cli("train-rm", f"model.path={tiny_model_dir}", f"output_dir={root / 'rm'}", "max_steps=2",
               "data.num_train=16", "data.num_eval=8", "batch_size=8", "eval.every=1000", *ONE_THREAD, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "rm" / "final"


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def longer_pairs(rows: list[dict]) -> list[dict]:
    """Every ordered pair of a prompt's responses the `length` rule orders, as label pairs=all writes them."""
    return [{"prompt": r["prompt"], "chosen": r["responses"][i], "rejected": r["responses"][j]} for r in rows
            for i, j in permutations(range(len(r["responses"])), 2) if len(r["responses"][i]) > len(r["responses"][j])]


def assert_each_composes(commands: list[list[str]]) -> None:
    """Every `rlhf ...` command line a Makefile prints composes as its stage or tool would (a bad key raises)."""
    from rlhf_cli.commands import compose, generate, label
    from rlhf_cli.config.tools import parse_overrides

    for command in commands:
        name, args = command[1], command[2:]
        if name in ("generate", "label"):
            parse_overrides({"generate": generate.GenerateToolConfig, "label": label.LabelToolConfig}[name], args, name)
        else:
            compose.compose_all(name, args, multirun=False)


# ---------------------------------------------------------------- generate


def test_generate_writes_k_responses_per_prompt_with_the_rows_columns(gens):
    rows = read_rows(gens)
    assert len(rows) == 24
    assert all(len(r["responses"]) == 3 and isinstance(r["answer"], str) for r in rows)  # the row's own column kept
    assert all(r["prompt"].startswith("Start at") for r in rows)
    assert len({resp for r in rows for resp in r["responses"]}) > 40  # sampled, not one greedy answer repeated


def test_generate_killed_and_rerun_writes_the_uninterrupted_file(gens, root, tiny_model_dir):
    out = root / "killed.jsonl"
    args = ["generate", f"model.path={tiny_model_dir}", f"output={out}", *GEN]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", *args], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 3 <= written < 24, f"the kill should land mid-way ({written} rows written)"
    with open(out, "a") as f:  # and a line torn by a kill mid-write
        f.write('{"prompt": "Start at 3. add')
    rerun = cli(*args, cwd=root)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming at prompt {written}" in (rerun.stdout + rerun.stderr).replace("\n", " ")
    assert out.read_bytes() == gens.read_bytes()
    again = cli(*args, cwd=root)  # complete: nothing generated twice
    assert again.returncode == 0 and "nothing to do" in (again.stdout + again.stderr).replace("\n", " ")
    assert out.read_bytes() == gens.read_bytes()


@pytest.mark.slow  # ~15 s: two ranks import torch; the one-process path is the same loop, tested above
@pytest.mark.distributed
def test_generate_under_torchrun_resumes_and_writes_the_one_process_file(gens, root, tiny_model_dir):
    """Two gloo ranks each sample every other batch (batch_size=5: batches of unequal count per rank) and
    continue a file a kill left with 7 rows and a torn line: the bytes of the one-process run."""
    out = root / "ranks.jsonl"
    lines = gens.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:7]) + lines[7][:20])
    (root / "ranks.jsonl.meta.json").write_bytes((root / "gens.jsonl.meta.json").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           "-m", "rlhf_cli", "generate", f"model.path={tiny_model_dir}", f"output={out}", *GEN,
                           "batch_size=5"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RLHF_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 ranks, resuming at prompt 7" in (proc.stdout + proc.stderr).replace("\n", " ")
    assert out.read_bytes() == gens.read_bytes()


@pytest.mark.parametrize("args, fragment", [
    (["seed=6"], "was generated with seed=5, not 6"),
    (["samples_per_prompt=2"], "was generated with samples_per_prompt=3, not 2"),
])
def test_generate_refuses_to_continue_a_file_with_other_settings(gens, root, tiny_model_dir, args, fragment):
    before = gens.read_bytes()
    proc = cli("generate", f"model.path={tiny_model_dir}", f"output={gens}", *GEN, *args, cwd=root)
    assert_one_line_error(proc, fragment)
    assert gens.read_bytes() == before


@pytest.mark.parametrize("args, fragment", [
    ([], "model.path= is required"),
    (["model.path=x"], "output= is required"),
    (["runs/rl/final", "output=o.jsonl"], "rlhf generate takes key=value settings only (got 'runs/rl/final')"),
    (["model.path=x", "output=o.jsonl", "samples_per_promt=2"], "did you mean samples_per_prompt"),
    (["model.path=x", "output=o.jsonl", "temperature=0"], "temperature must be > 0"),
    (["model.path=x", "output=o.jsonl", "engine=sglang"], "engine='sglang' is not one of auto, lean, hf, vllm"),
    pytest.param(["model.path=x", "output=o.jsonl", "engine=vllm"], "engine=vllm needs vLLM, which is not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")),
    (["model.path=x", "output=no/such/dir/o.jsonl"], "directory of no/such/dir/o.jsonl does not exist"),
])
def test_generate_bad_input(tmp_path, args, fragment):
    proc = run_cli("generate", *args, cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_refuses_a_file_it_did_not_write_and_a_reward_model(root, reward_model, tiny_model_dir):
    other = write_jsonl(root / "mine.jsonl", [{"prompt": "x"}])
    assert_one_line_error(cli("generate", f"model.path={tiny_model_dir}", f"output={other}", cwd=root),
                          "was not written by `rlhf generate`")
    assert_one_line_error(cli("generate", f"model.path={reward_model}", f"output={root / 'g2.jsonl'}", cwd=root),
                          "is a reward model")
    assert not (root / "g2.jsonl").exists()


# ---------------------------------------------------------------- label


def test_label_rule_best_worst_and_all_pairs_follow_the_rule(gens, root):
    rows = read_rows(gens)
    # unfinished=keep: the untrained model's responses run to max_new_tokens; the pairing itself is tested here
    best = cli("label", f"input={gens}", "judge=rule", "reward.functions=[looprules:length]", "margin=true", KEEP,
               f"output={root / 'bw.jsonl'}", cwd=root)
    assert best.returncode == 0, best.stdout + best.stderr
    pairs = read_rows(root / "bw.jsonl")
    differ = [r for r in rows if len({len(x) for x in r["responses"]}) > 1]
    assert len(pairs) == len(differ) > 0
    for pair, row in zip(pairs, differ):
        lengths = [len(x) for x in row["responses"]]
        assert (pair["prompt"], pair["answer"]) == (row["prompt"], row["answer"])
        assert len(pair["chosen"]) == max(lengths) and len(pair["rejected"]) == min(lengths)
        assert pair["margin"] == max(lengths) - min(lengths)
    every = cli("label", f"input={gens}", "judge=rule", "reward.functions=[looprules:length]", "pairs=all", KEEP,
                f"output={root / 'all.jsonl'}", cwd=root)
    assert every.returncode == 0, every.stdout + every.stderr
    expected = [(p["prompt"], p["chosen"], p["rejected"]) for p in longer_pairs(rows)]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in read_rows(root / "all.jsonl")] == expected
    assert "margin" not in read_rows(root / "all.jsonl")[0]
    summary = [line for line in (every.stdout + every.stderr).splitlines() if line.startswith("wrote ")]
    assert len(summary) == 1 and summary[0].endswith("had no score difference)"), summary  # one line, not cut at 80


@pytest.mark.slow  # over 15 s of CPU: out of the default run (make test-slow runs it)
def test_label_rm_judge_and_mining_the_reward_models_disagreements(gens, root, reward_model):
    import torch

    from rlhf_cli.models import load_scalar_head_model, load_tokenizer
    from rlhf_cli.models.scoring import score_texts

    mined = cli("label", f"input={gens}", "judge=rule", "reward.functions=[looprules:length]", "pairs=all", KEEP,
                "mine=disagree", f"reward.model.path={reward_model}", f"output={root / 'mined.jsonl'}", *ONE_THREAD,
                cwd=root)
    assert mined.returncode == 0, mined.stdout + mined.stderr
    judged = longer_pairs(read_rows(gens))
    kept = read_rows(root / "mined.jsonl")
    model = load_scalar_head_model(str(reward_model), "rm")
    tok = load_tokenizer(str(reward_model), "rm")

    def rm_prefers_chosen(pairs):
        prompts = [p["prompt"] for p in pairs]
        chosen = score_texts(model, tok, prompts, [p["chosen"] for p in pairs], torch.device("cpu"))
        rejected = score_texts(model, tok, prompts, [p["rejected"] for p in pairs], torch.device("cpu"))
        return (chosen > rejected).tolist()

    assert kept and not any(rm_prefers_chosen(kept))  # every kept pair is one the RM gets wrong
    wrong = [p for p, right in zip(judged, rm_prefers_chosen(judged)) if not right]
    assert [(p["chosen"], p["rejected"]) for p in kept] == [(p["chosen"], p["rejected"]) for p in wrong]  # all kept
    by_rm = cli("label", f"input={gens}", "judge=rm", f"reward.model.path={reward_model}", "margin=true", KEEP,
                f"output={root / 'rm_pairs.jsonl'}", *ONE_THREAD, cwd=root)
    assert by_rm.returncode == 0, by_rm.stdout + by_rm.stderr
    pairs = read_rows(root / "rm_pairs.jsonl")
    assert pairs and all(rm_prefers_chosen(pairs)) and all(p["margin"] > 0 for p in pairs)


@pytest.mark.parametrize("case, fragment", [
    ("no responses", "has no `responses`"),
    ("one response", "a pair needs >= 2"),
    ("judge returns text", "returned 'not a number', not a finite number"),
    ("rule judge without functions", "judge=rule needs reward.functions"),
    ("rm judge without a model", "judge=rm needs reward.model.path"),
    ("mine with the rm judge", "judge=rm is that same model"),
    ("mine without a model", "mine=disagree needs reward.model.path"),
    ("mine with the human judge", "mine=disagree is for judge=rule"),
    ("rm judge given a base LM", "is not a reward model"),
    ("output exists", "exists; choose another output"),
    ("unknown key", "did you mean judge"),
    ("bad port", "is not a TCP port"),
    ("a positional argument", "rlhf label takes key=value settings only (got 'gens.jsonl')"),
])
def test_label_bad_input(gens, root, tiny_model_dir, tmp_path, case, fragment):
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    single = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "responses": ["a"]}])
    out = f"output={tmp_path / 'out.jsonl'}"
    rule = "reward.functions=[looprules:length]"
    args = {"no responses": [f"input={pairs_file}", rule, out],
            "one response": [f"input={single}", rule, out],
            "judge returns text": [f"input={gens}", "reward.functions=[looprules:words]", out],
            "rule judge without functions": [f"input={gens}", out],
            "rm judge without a model": [f"input={gens}", "judge=rm", out],
            "mine with the rm judge": [f"input={gens}", "judge=rm", "mine=disagree", "reward.model.path=x", out],
            "mine without a model": [f"input={gens}", rule, "mine=disagree", out],
            "mine with the human judge": [f"input={gens}", "judge=human", "mine=disagree", "reward.model.path=x", out],
            "rm judge given a base LM": [f"input={gens}", "judge=rm", f"reward.model.path={tiny_model_dir}", out],
            "output exists": [f"input={gens}", rule, f"output={pairs_file}"],
            "unknown key": [f"input={gens}", "jugde=rm", out],
            "a positional argument": ["gens.jsonl", rule, out],
            "bad port": [f"input={gens}", "judge=human", "port=70000", out]}[case]
    before = pairs_file.read_bytes()
    proc = cli("label", *args, cwd=root)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out.jsonl").exists() and pairs_file.read_bytes() == before


# ---------------------------------------------------------------- train-rm: a round adds to what the RM knew


def test_train_rm_continues_a_reward_model_on_several_files(root, reward_model):
    from rlhf_cli import task

    parent = json.loads((reward_model / "manifest.json").read_text())
    rows = task.preference_rows(10, seed=0, split="train", n_eval=8)
    first, second = write_jsonl(root / "pairs.jsonl", rows[:6]), write_jsonl(root / "round1.jsonl", rows[6:])
    # the parent's own held-out pairs (the embedded split it evaluated on): the same numbers before training
    held_out = write_jsonl(root / "held_out.jsonl", task.preference_rows(8, seed=0, split="eval", n_eval=8))
    proc = cli("train-rm", f"model.path={reward_model}", f"output_dir={root / 'rm2'}", f"data.train=[{first},{second}]",
               f"data.eval={held_out}", "max_steps=1", "batch_size=4", "eval.every=1000", *ONE_THREAD, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    child = json.loads((root / "rm2" / "final" / "manifest.json").read_text())
    assert child["pairs"]["train"] == 10  # both files, in full
    assert child["parent_model"] == str(reward_model)
    # the head was kept: before its first step the child scores the held-out pairs exactly as the parent did
    # (a re-initialised head scores every response 0: margin 0, score std 0)
    assert parent["metrics"]["eval_score_std"] > 0
    for key in ("eval_margin", "eval_score_mean", "eval_score_std", "eval_accuracy"):
        assert child["metrics_before"][key] == pytest.approx(parent["metrics"][key], rel=1e-5, abs=1e-7), key


# ---------------------------------------------------------------- the loop as a Makefile (docs/loop.md)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_every_command_of_the_loop_makefile_is_a_valid_command_line(tmp_path):
    """`make -n` prints the loop's commands in order; each composes against its schema (no model, no files)."""
    import shlex

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(repo / "scripts" / "loop.mk"), "ROUNDS=2",
                           f"RUNS={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    # the original pairs written once (the embedded task's), beside the rlhf commands
    assert sum("task.preference_rows(32000" in line for line in lines) == 1
    commands = [shlex.split(line) for line in lines if line.startswith("rlhf ")]
    assert [c[1] for c in commands] == ["sft", "train-rm", "rl"] + ["generate", "label", "train-rm", "rl"] * 2
    assert_each_composes(commands)
    last_rm = [c for c in commands if c[1] == "train-rm"][-1]
    # the original pairs once and every round's mined pairs MINED_COPIES (default 8) times
    files = ",".join([f"{tmp_path}/pairs0.jsonl"] + [f"{tmp_path}/pairs{k}.jsonl" for k in (1, 2) for _ in range(8)])
    assert f"data.train=[{files}]" in last_rm
    assert f"model.path={tmp_path}/rm1/final" in last_rm  # continued from the round before


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_loop_report_labels_each_rounds_held_out_samples(tmp_path):
    """`make -n report`: per round, the policy's samples on held-out prompts labeled by the rule, then the table."""
    import shlex

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(repo / "scripts" / "loop.mk"), "ROUNDS=1",
                           f"RUNS={tmp_path}", "report"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    held = [c for c in lines if c[:2] == ["rlhf", "generate"] and f"output={tmp_path}/held1.jsonl" in c]
    assert held and "data.split=eval" in held[0] and f"model.path={tmp_path}/rl1/final" in held[0]
    labels = [c for c in lines if c[:2] == ["rlhf", "label"] and f"output={tmp_path}/heldpairs1.jsonl" in c]
    assert labels and "pairs=all" in labels[0] and not any(a.startswith("mine=") for a in labels[0])
    assert lines[-1][-3:] == [str(repo / "scripts" / "loop_report.py"), str(tmp_path), "1"]


def test_the_loop_reports_agreement_counting_ties_half(root, reward_model):
    """scripts/loop_report.py's RM accuracy: a pair and its swap split one between them; a tie is half."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from loop_report import rm_agreement

    from rlhf_cli import task

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in task.preference_rows(6, seed=3)]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    ties = [{**r, "rejected": r["chosen"]} for r in rows]
    a, n = rm_agreement(reward_model, write_jsonl(root / "agree.jsonl", rows))
    b, _ = rm_agreement(reward_model, write_jsonl(root / "swapped.jsonl", swapped))
    assert n == 6 and a + b == pytest.approx(1.0)
    assert rm_agreement(reward_model, write_jsonl(root / "ties.jsonl", ties)) == (0.5, 6)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_loop_can_continue_each_round_from_the_last_policy_with_the_sft_reference(tmp_path):
    """RL_FROM=previous: rl{k} starts from rl{k-1} and keeps its KL to the sft policy; MINED_COPIES repeats pairs."""
    import shlex

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(repo / "scripts" / "loop.mk"), "ROUNDS=2",
                           f"RUNS={tmp_path}", "RL_FROM=previous", "MINED_COPIES=2"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    rl = [c for c in lines if c[:2] == ["rlhf", "rl"]]
    assert f"policy.path={tmp_path}/sft/final" in rl[0]
    for k in (1, 2):
        assert f"policy.path={tmp_path}/rl{k - 1}/final" in rl[k]
        assert f"reference.path={tmp_path}/sft/final" in rl[k]
    last_rm = [c for c in lines if c[:2] == ["rlhf", "train-rm"]][-1]
    p = str(tmp_path)
    assert f"data.train=[{p}/pairs0.jsonl,{p}/pairs1.jsonl,{p}/pairs1.jsonl,{p}/pairs2.jsonl,{p}/pairs2.jsonl]" in last_rm


def test_label_leaves_empty_responses_out_of_pairs(root):
    """A policy that stops at once writes an empty response: no pair gets an empty side (train-rm refuses one)."""
    gens = write_jsonl(root / "empty_gens.jsonl", [{"prompt": "p1", "responses": ["", "ab", "abcd"]},
                                                    {"prompt": "p2", "responses": ["  ", "x"]}])
    for pairs, expected in (("all", [("p1", "abcd", "ab")]), ("best_worst", [("p1", "abcd", "ab")])):
        proc = cli("label", f"input={gens}", "judge=rule", "reward.functions=[looprules:length]", f"pairs={pairs}",
                   f"output={root / f'empty_{pairs}.jsonl'}", cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 empty responses left out" in proc.stdout + proc.stderr
        assert [(p["prompt"], p["chosen"], p["rejected"]) for p in read_rows(root / f"empty_{pairs}.jsonl")] == expected


def test_generate_flags_responses_cut_at_the_limit_and_label_leaves_them_out(root, gens):
    """`stopped` says which responses ended at the stop token; label pairs those only (unfinished=drop, the
    default) and counts the rest: a cut answer would teach dpo to stop mid-answer."""
    rows = read_rows(gens)  # the untrained model at max_new_tokens=24: most run to the limit, a few emit EOS
    flags = [x for r in rows for x in r["stopped"]]
    assert all(len(r["stopped"]) == 3 for r in rows) and any(flags) and not all(flags)
    proc = cli("label", f"input={gens}", "judge=rule", "reward.functions=[looprules:length]", "pairs=all",
               f"output={root / 'stop_pairs.jsonl'}", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cut = sum(1 for r in rows for t, d in zip(r["responses"], r["stopped"]) if t.strip() and not d)
    assert f"{cut} responses cut at max_new_tokens left out" in " ".join((proc.stdout + proc.stderr).split())
    done = [{"prompt": r["prompt"], "responses": [t for t, d in zip(r["responses"], r["stopped"]) if d]} for r in rows]
    expected = [(p["prompt"], p["chosen"], p["rejected"]) for p in longer_pairs(done)]
    pairs = read_rows(root / "stop_pairs.jsonl")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == expected
    assert all("stopped" not in p for p in pairs)
    bad = write_jsonl(root / "bad_stopped.jsonl", [{"prompt": "p", "responses": ["a", "b"], "stopped": [True]}])
    assert_one_line_error(cli("label", f"input={bad}", "judge=rule", "reward.functions=[looprules:length]",
                              f"output={root / 'never.jsonl'}", cwd=root), "`stopped` must be one true/false")


# ---------------------------------------------------------------- iterated DPO (scripts/dpo_loop.mk)


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_dpo_loop_continues_each_round_from_the_last_policy_on_its_own_pairs(tmp_path):
    """`make -n`: sft -> dpo0, then per round generate from dpo{k-1} -> label -> dpo{k} from dpo{k-1} on that
    round's pairs, every dpo measured on the same held-out pairs; each command composes as the stage or tool would."""
    import shlex


    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["make", "-n", "--no-print-directory", "-f", str(repo / "scripts" / "dpo_loop.mk"), "ROUNDS=2",
                           f"RUNS={tmp_path}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]
    commands = [shlex.split(line) for line in lines if line.startswith("rlhf ")]
    assert [c[1] for c in commands] == ["sft", "dpo"] + ["generate", "label", "dpo"] * 2
    assert_each_composes(commands)
    dpo = [c for c in commands if c[1] == "dpo"]
    assert f"model.path={tmp_path}/sft/final" in dpo[0]
    for k in (1, 2):
        assert f"model.path={tmp_path}/dpo{k - 1}/final" in dpo[k] and f"data.train={tmp_path}/pairs{k}.jsonl" in dpo[k]
        gen = [c for c in commands if c[1] == "generate"][k - 1]
        assert f"model.path={tmp_path}/dpo{k - 1}/final" in gen
    assert all(f"data.eval={tmp_path}/pairs_eval.jsonl" in c for c in dpo)
    bad = subprocess.run(["make", "-n", "-f", str(repo / "scripts" / "dpo_loop.mk"), "JUDGE=rm"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "JUDGE=rm needs REWARD_MODEL=" in bad.stderr


@pytest.mark.slow  # ~2.5 minutes of CPU: out of the default run (make test-slow runs it)
@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_dpo_loop_runs_a_round_end_to_end_and_reports_it(tmp_path):
    """One real round at a few steps a stage: the rule labels the policy's own samples, dpo1 trains on them from
    dpo0, and the report has a row per run."""
    repo = Path(__file__).resolve().parents[2]
    quick = "eval.every=1000 eval.max_new_tokens=48 device.threads=1"
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", "-f", str(repo / "scripts" / "dpo_loop.mk"), "ROUNDS=1",
                           f"RUNS={tmp_path}", f"RLHF={sys.executable} -m rlhf_cli", f"PYTHON={sys.executable}",
                           f"SFT_ARGS=max_steps=300 data.num_train=4000 data.num_eval=16 {quick}",
                           f"DPO_ARGS=max_steps=4 batch_size=2 {quick}",
                           "GEN_ARGS=data.num_prompts=48 max_new_tokens=48", "all", "report"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    pairs = [json.loads(line) for line in (tmp_path / "pairs1.jsonl").read_text().splitlines()]
    assert pairs and all({"prompt", "chosen", "rejected", "answer"} <= set(p) for p in pairs)
    manifest = json.loads((tmp_path / "dpo1" / "final" / "manifest.json").read_text())
    assert manifest["pairs"]["train"] + manifest["pairs"]["dropped_train"] == len(pairs)  # every pair, none held out
    assert manifest["parent_model"] == f"{tmp_path}/dpo0/final"
    report = (tmp_path / "report.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in report[2:]] == ["sft", "dpo0", "dpo1"]
