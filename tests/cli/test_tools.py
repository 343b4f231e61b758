"""`rlhf validate`, `rlhf eval`, `rlhf plot` and TensorBoard logging, through the real CLI.

One small real sweep (two 3-step sft jobs with TensorBoard on) and one 2-step reward
model feed the tests; every command runs as a subprocess, as a user runs it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import assert_one_line_error, run_cli
from helpers import TOOLS_TINY as TINY
from helpers import read_metrics as metric_lines

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`rlhf sft -m seed=0,1` with TensorBoard on: a sweep dir with two runs."""
    root = tmp_path_factory.mktemp("tools")
    proc = run_cli("sft", "-m", "seed=0,1", "max_steps=3", "log_every=1", "logging.tensorboard=true",
                   f"output_dir={root / 'sweep'}", *TINY, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "sweep"


@pytest.fixture(scope="module")
def reward_model(sweep):
    proc = run_cli("train-rm", f"model.path={sweep / 'seed-0' / 'final'}", f"output_dir={sweep.parent / 'rm'}",
                   "max_steps=1", "data.num_train=16", "data.num_eval=8", "batch_size=8", "eval.every=1000",
                   cwd=sweep.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sweep.parent / "rm" / "final"


# ---------------------------------------------------------------- logging


def test_tensorboard_event_files_hold_the_logged_metrics_and_the_config(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sweep / "seed-0"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "eval/eval_loss"} <= set(events.Tags()["scalars"])
    train = [r for r in metric_lines(run) if r["kind"] == "train"]
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [r["step"] for r in train] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in train], rel=1e-6)  # same numbers as metrics.jsonl
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"tensorboard": true' in config_text and '"seed": 0' in config_text  # the resolved config is attached


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_asked_for_but_not_installed(tmp_path):
    proc = run_cli("sft", "logging.wandb=true", "output_dir=out", cwd=tmp_path)
    assert_one_line_error(proc, "pip install wandb")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- plot


def test_plot_compares_the_runs_of_a_sweep(sweep, tmp_path):
    import matplotlib.image

    out = tmp_path / "figs" / "sweep.png"
    proc = run_cli("plot", str(sweep), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 run(s) (seed-0, seed-1)" in proc.stderr
    assert "panels: sft: loss, sft: eval_loss, sft: eval_accuracy, sft: eval_response_chars" in proc.stderr
    raw = out.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and len(raw) > 10_000
    height, width, channels = matplotlib.image.imread(out).shape
    assert (width, height) == (1500, 680) and channels in (3, 4)  # 3 columns x 2 rows of panels at 100 dpi


def test_plot_chosen_keys_of_run_dirs(sweep, tmp_path):
    proc = run_cli("plot", str(sweep / "seed-0"), str(sweep / "seed-1"), "--keys", "lr,loss", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "panels: sft: lr, sft: loss" in proc.stderr


def test_plot_keeps_each_stages_metrics_in_its_own_panels(sweep, reward_model):
    """sft's generation accuracy and train-rm's pairwise accuracy, sft's next-token loss and train-rm's
    Bradley-Terry loss: never one panel. Read from the figure the CLI draws (its axes, titles, lines)."""
    import matplotlib.pyplot as plt

    from rlhf_cli.commands.plot import build_figure, find_runs

    runs = find_runs([str(sweep), str(reward_model.parent)])
    fig, panels = build_figure(runs)
    try:
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        assert len(axes) == len(panels)
        for title in ("sft: loss", "train-rm: loss", "sft: eval_accuracy", "train-rm: eval_accuracy"):
            assert title in axes, sorted(axes)
        rm_label = str(reward_model.parent)
        sft_labels = {f"{sweep}/seed-0", f"{sweep}/seed-1"}
        for title, ax in axes.items():
            labels = {line.get_label() for line in ax.get_lines()}
            assert labels, title
            assert labels == ({rm_label} if title.startswith("train-rm: ") else sft_labels), title
        assert axes["train-rm: eval_accuracy"].get_ylabel() == "held-out pairwise accuracy"
        assert axes["sft: eval_accuracy"].get_ylabel() == "held-out generation accuracy (eval.rule)"
        assert axes["train-rm: bt_loss"].get_ylabel() == "Bradley-Terry pairwise loss"
        assert [title.split(":")[0] for title in axes] == sorted((t.split(":")[0] for t in axes),
                                                                key=["sft", "train-rm"].index)  # stages grouped
    finally:
        plt.close(fig)


@pytest.mark.parametrize("args,fragment", [
    (["nope"], "run dir nope does not exist"),
    (["empty"], "no metrics.jsonl in empty"),
    ([], "no RUN_DIR given"),
])
def test_plot_bad_input(tmp_path, args, fragment):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_one_line_error(run_cli("plot", *args, cwd=tmp_path), fragment)


# ---------------------------------------------------------------- eval


def test_eval_reproduces_the_runs_held_out_numbers_and_scores_with_a_reward_model(sweep, reward_model, tmp_path):
    run = sweep / "seed-0"
    proc = run_cli("eval", str(run), f"reward.model.path={reward_model}", "device=cpu", "device.threads=1",
                   "eval.show_samples=2", "--json", "eval.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sample generations" in proc.stderr and "reward-model score" in proc.stderr
    result = json.loads((tmp_path / "eval.json").read_text())
    reported = json.loads((run / "final" / "manifest.json").read_text())["metrics"]
    metrics = result["metrics"]
    # same held-out split, generation length and rule as the run's own final evaluation
    assert metrics["prompts"] == 8 and result["max_new_tokens"] == 6
    assert metrics["accuracy"] == reported["eval_accuracy"]
    assert metrics["response_chars"] == pytest.approx(reported["eval_response_chars"])
    assert len(result["samples"]) == 2 and len(result["generations"]) == 8
    rm = json.loads((reward_model / "manifest.json").read_text())
    scores = [g["rm_score"] for g in result["generations"]]
    assert metrics["rm_score"] == pytest.approx(sum(scores) / len(scores))
    assert metrics["rm_score_normalized"] == pytest.approx((metrics["rm_score"] - rm["score_mean"]) / rm["score_std"])


def test_eval_on_a_file_without_answers_reports_no_accuracy(sweep, tmp_path):
    (tmp_path / "held_out.jsonl").write_text('{"prompt": "Start at 1. add 2. sub 1. add 3.\\n"}\n'
                                             '{"messages": [{"role": "user", "content": "hi"}]}\n')
    proc = run_cli("eval", str(sweep / "seed-1" / "final"), "data.eval=held_out.jsonl", "--json", "out.json",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["metrics"]["prompts"] == 2 and "accuracy" not in result["metrics"]
    assert result["generations"][1]["prompt"] == "<|user|>hi\n<|assistant|>"  # the model's chat template


def test_eval_samples_gives_pass_at_k_and_majority_vote(sweep, tmp_path):
    """`rlhf eval CKPT eval.samples=8 --json out.json`: pass@1, pass@8 and maj@8 printed and written under those
    names, pass@1 <= pass@4 <= pass@8, and each equal to what the per-prompt counts of right samples give. The rule
    (a response writing a digit) is one an untrained policy meets sometimes, so the numbers are not all 0 or 1."""
    (tmp_path / "digitrule.py").write_text("def has_digit(prompt, response, **row):\n"
                                           "    return float(any(map(str.isdigit, response)))\n")
    proc = run_cli("eval", str(sweep / "seed-0"), "eval.samples=8", "eval.pass_k=[1,4,8]",
                   "eval.rule=digitrule:has_digit", "--json", "out.json", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(name in proc.stdout + proc.stderr for name in ("pass@1", "pass@8", "maj@8"))
    result = json.loads((tmp_path / "out.json").read_text())
    metrics, counts = result["metrics"], [g["samples_correct"] for g in result["generations"]]
    assert result["samples_per_prompt"] == 8 and len(counts) == metrics["prompts"] == 8
    assert {"accuracy", "pass@1", "pass@4", "pass@8", "maj@1", "maj@4", "maj@8"} <= metrics.keys()
    assert 0 < metrics["pass@1"] < 1, counts
    assert metrics["pass@1"] <= metrics["pass@4"] <= metrics["pass@8"]
    assert metrics["pass@1"] == pytest.approx(sum(counts) / 64)
    assert metrics["pass@8"] == pytest.approx(sum(c > 0 for c in counts) / 8)
    assert 0 <= metrics["maj@8"] <= 1


@pytest.mark.parametrize("args,fragment", [
    (["{run}", "eval.samples=4", "eval.pass_k=[1,8]"], "eval.pass_k=[1, 8] needs every k in [1, eval.samples=4]"),
    (["missing/final"], "does not exist"),
    (["{run}", "eval.max_new_tokns=4"], "did you mean eval.max_new_tokens"),
    (["{run}", "data.eval=nope.jsonl"], "file not found"),
    (["{rm}"], "is a reward model"),
    (["{run}", "rollout.engine=sglang"], "rollout.engine='sglang' is not one of auto, lean, hf, vllm"),
    pytest.param(["{run}", "rollout.engine=vllm"], "rollout.engine=vllm needs vLLM, which is not installed",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")),
])
def test_eval_bad_input(sweep, reward_model, tmp_path, args, fragment):
    args = [a.format(run=sweep / "seed-0", rm=reward_model) for a in args]
    assert_one_line_error(run_cli("eval", *args, cwd=tmp_path), fragment)


# ---------------------------------------------------------------- validate


def test_validate_counts_rows_of_user_files_without_loading_models(sweep, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}\n", "completion": "a" * (10 + 200 * (i == 0))})
                                                  + "\n" for i in range(5)))
    (tmp_path / "eval.csv").write_text("prompt,completion\nq,a\nr,b\n")
    proc = run_cli("validate", "sft", f"model.path={sweep / 'seed-0' / 'final'}", "data.train=train.jsonl",
                   "data.eval=eval.csv", "batch_size=4", "output_dir=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok: rlhf sft" in proc.stderr
    assert "data.train: 5 rows (train.jsonl); 1 truncated" in proc.stderr
    assert "data.eval: 2 rows (eval.csv)" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing is written


def test_validate_every_combination_of_a_sweep(tmp_path):
    proc = run_cli("validate", "rl", "-m", "algorithm=reinforce,ppo", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok: rlhf rl 2 sweep combinations" in proc.stderr and "data.train: 4000 rows (embedded task)" in proc.stderr


@pytest.mark.parametrize("args,fragment", [
    (["sft", "optim.lrr=1"], "did you mean optim.lr"),
    (["train-rm", "data.train=sft_rows.jsonl"], "sft_rows.jsonl line 1: has no chosen or rejected"),
    (["rl", "policy.path=no/such/model"], "does not exist"),
    (["rl", "reward.functions=[nowhere.mod:fn]"], "cannot import module 'nowhere.mod'"),
    (["stf"], "did you mean 'sft'"),
])
def test_validate_bad_input(tmp_path, args, fragment):
    (tmp_path / "sft_rows.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    assert_one_line_error(run_cli("validate", *args, cwd=tmp_path), fragment)


def test_help_lists_the_tools(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for tool in ("validate", "eval", "plot", "generate", "label"):
        assert f"rlhf {tool}" in proc.stdout
