"""Helpers the tests share: files written by a test, metrics and weights read back, quick argument lists.

Import what you need: `from helpers import write_jsonl, read_metrics, QUICK_SFT`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# ---------------------------------------------------------------- quick argument lists (a few seconds a run)
# sft / train-rm / rl on the tiny model: small data, no evaluation until the end, short responses
QUICK_SFT = ["data.num_train=32", "data.num_eval=8", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=4"]
QUICK_RM = ["data.num_train=64", "data.num_eval=16", "batch_size=8", "eval.every=1000", "log_every=1",
            "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]
QUICK_RL = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "eval.every=1000", "data.num_eval=20",
            "data.num_train=200", "log_every=1"]
ONE_THREAD = ["device=cpu", "device.threads=1"]  # tiny matmuls: a second thread only waits on a shared machine

# per test module, each tuned to what its tests need
# test_bad_inputs.py: two steps, no evaluation, one thread (many subprocesses at once)
BAD_INPUT_SFT = ["data.num_train=16", "data.num_eval=4", "batch_size=4", "max_steps=2", "eval.every=1000",
                 "eval.max_new_tokens=4", "model.max_length=64", "device=cpu", "device.threads=1"]
BAD_INPUT_RM = ["data.num_train=16", "data.num_eval=4", "batch_size=4", "max_steps=2", "eval.every=1000",
                "model.max_length=96", "device=cpu", "device.threads=1"]
BAD_INPUT_RL = ["data.num_train=8", "data.num_eval=4", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                "rollout.max_new_tokens=4", "max_steps=2", "eval.every=1000", "eval.max_new_tokens=4", "device=cpu",
                "device.threads=1"]
# test_distributed.py: three steps; RL with 4 prompts x 2 samples and a reward that varies on an untrained model
DIST_COMMON = ["data.num_train=64", "data.num_eval=8", "eval.every=100", "eval.max_new_tokens=4", "optim.warmup_steps=0",
               "optim.min_lr_ratio=1.0", "max_steps=3", "log_every=1", "device=cpu", "device.threads=1"]
DIST_RL = ["data.num_train=64", "data.num_eval=4", "eval.every=100", "eval.max_new_tokens=4", "device=cpu",
           "device.threads=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
           "rollout.max_new_tokens=6", "reward.functions=[spread_reward:spread]", "checkpoint.every=1"]
# test_faults.py: tiny but complete: evaluation every 3 steps, a checkpoint every 2, pruning with keep_last=2
FAULTS_COMMON = ["eval.every=3", "eval.max_new_tokens=8", "checkpoint.every=2", "checkpoint.keep_last=2", "log_every=1",
                 "device=cpu", "device.threads=1"]
FAULTS_SFT = ["data.num_train=32", "data.num_eval=4", "batch_size=4", "model.max_length=64", "eval.every=1000",
              "eval.max_new_tokens=4", "optim.warmup_steps=0", "log_every=1", "device=cpu", "device.threads=1"]
# cli/test_tools.py
TOOLS_TINY = ["data.num_train=32", "data.num_eval=8", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=6"]
# stages/test_lora.py: a high learning rate so that four-rank adapters move in a few steps
LORA_QUICK = ["data.num_train=96", "data.num_eval=16", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=8",
              "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "optim.lr=2e-2", "log_every=1", "checkpoint.every=3",
              "device=cpu", "device.threads=1"]
LORA_ADAPTERS = ["lora.r=4", "lora.alpha=8"]
# stages/test_sft.py
SFT_QUICK = ["data.num_train=96", "data.num_eval=16", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=8",
             "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "log_every=1"]


# ---------------------------------------------------------------- files a test writes
def write_text(path: Path, text: str | bytes) -> Path:
    """Write text (or bytes), making parent dirs; -> the path (for key=path overrides)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON object per line; -> the path."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- what a run wrote
def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl (only those of `kind`, 'train' or 'eval', when given); a line
    torn by a kill is skipped; no file: []."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if kind is None or r["kind"] == kind]


def load_weights(where: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or the model.safetensors of a run's final/ (or of a model dir)."""
    where = Path(where)
    if where.is_dir():
        where = where / "final" / "model.safetensors" if (where / "final").is_dir() else where / "model.safetensors"
    return load_file(where)


def assert_same_weights(a: Path, b: Path) -> None:
    """Bit-identical tensors under the same names."""
    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_rl_resume_is_bit_identical(tmp_path: Path, common: list[str]) -> None:
    """`rlhf rl COMMON` three steps straight (tmp_path/a) and one step, then a resume to three (tmp_path/b): both
    must end with the same weights, bit for bit (COMMON saves a checkpoint every step)."""
    from conftest import run_cli

    straight = run_cli("rl", f"output_dir={tmp_path / 'a'}", "max_steps=3", *common, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr
    for steps in (1, 3):
        proc = run_cli("rl", f"output_dir={tmp_path / 'b'}", f"max_steps={steps}", *common, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
