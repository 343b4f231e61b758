"""torchrun with the gloo backend on CPU: the same code path as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli

pytestmark = pytest.mark.distributed
COMMON = ["data.num_train=64", "data.num_eval=8", "eval.every=100", "eval.max_new_tokens=4", "optim.warmup_steps=0",
          "optim.min_lr_ratio=1.0", "max_steps=3", "device=cpu", "device.threads=1"]


def torchrun(nproc: int, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           "--standalone", "-m", "rlhf_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_sft_two_ranks_of_b_equal_one_rank_of_2b(tmp_path):
    two = torchrun(2, "sft", f"output_dir={tmp_path / 'ddp'}", "batch_size=8", *COMMON, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("sft", f"output_dir={tmp_path / 'single'}", "batch_size=16", *COMMON, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    b = load_file(tmp_path / "single" / "final" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert "global batch 16 = 8 x 1 accum x 2 ranks" in two.stdout + two.stderr
