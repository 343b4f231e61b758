"""A user's own task through the public keys only: sft -> train-rm -> rl, chained by path."""

from __future__ import annotations

import json
import random
import string

from conftest import run_cli
from helpers import write_jsonl as _write_jsonl

REWARD_MODULE = '''
def exact(prompt, response, target=None, **row):
    """1 when the response is the letter written three times."""
    return 1.0 if response.strip() == target else 0.0
'''


def _task(tmp_path):
    rng = random.Random(0)
    letters = string.ascii_lowercase

    def prompt(c):
        return f"Write {c} three times.\n"

    sft = [{"prompt": prompt(c), "completion": c * (2 if rng.random() < 0.6 else 3), "target": c * 3}
           for c in (rng.choice(letters) for _ in range(400))]  # sloppy demonstrations: mostly twice
    evals = [{"prompt": prompt(c), "completion": c * 3, "target": c * 3} for c in letters]
    pairs = [{"prompt": prompt(c), "chosen": c * 3, "rejected": c * rng.choice([1, 2, 4])}
             for c in (rng.choice(letters) for _ in range(400))]
    eval_pairs = [{"prompt": prompt(c), "chosen": c * 3, "rejected": c * 2} for c in letters]
    (tmp_path / "usertask.py").write_text(REWARD_MODULE)
    return {name: _write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in
            {"sft": sft, "eval": evals, "pairs": pairs, "eval_pairs": eval_pairs,
             "prompts": [{"prompt": r["prompt"], "target": r["target"]} for r in sft]}.items()}


def test_a_users_own_task_improves_through_all_three_stages(tmp_path, tiny_model_dir):
    files = _task(tmp_path)
    env = {"PYTHONPATH": str(tmp_path)}
    common = ["eval.rule=usertask:exact", "eval.max_new_tokens=8", "eval.every=1000"]
    sft = run_cli("sft", f"model.path={tiny_model_dir}", f"data.train={files['sft']}", f"data.eval={files['eval']}",
                  "output_dir=sft", "max_steps=150", "batch_size=32", *common, cwd=tmp_path, env=env)
    assert sft.returncode == 0, sft.stderr
    rm = run_cli("train-rm", "model.path=sft/final", f"data.train={files['pairs']}", f"data.eval={files['eval_pairs']}",
                 "output_dir=rm", "max_steps=100", "eval.every=1000", cwd=tmp_path, env=env)
    assert rm.returncode == 0, rm.stderr
    rl = run_cli("rl", "policy.path=sft/final", "reward.model.path=rm/final", "reward.functions=[usertask:exact]",
                 f"data.train={files['prompts']}", f"data.eval={files['eval']}", "algorithm=reinforce",
                 "rollout.max_new_tokens=8", "max_steps=20", "output_dir=rl", *common, cwd=tmp_path, env=env)
    assert rl.returncode == 0, rl.stderr

    sft_m = json.loads((tmp_path / "sft" / "final" / "manifest.json").read_text())
    rm_m = json.loads((tmp_path / "rm" / "final" / "manifest.json").read_text())
    rl_m = json.loads((tmp_path / "rl" / "final" / "manifest.json").read_text())
    assert sft_m["metrics"]["eval_loss"] < sft_m["metrics_before"]["eval_loss"]
    assert rm_m["metrics"]["eval_accuracy"] >= 0.8
    before, after = rl_m["metrics_before"]["eval_accuracy"], rl_m["metrics"]["eval_accuracy"]
    assert after >= before + 0.3, (before, after)
    assert rl_m["sft_run"] == str((tmp_path / "sft").resolve()) and rl_m["rm_run"] == str((tmp_path / "rm").resolve())
    assert rl_m["parent_run"] == rl_m["sft_run"] and rm_m["parent_run"] == sft_m["run_dir"]  # every stage's name too
