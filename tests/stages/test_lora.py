"""LoRA through peft in every stage, end to end on the tiny model: adapter and merged finals
load with peft / plain transformers and compute what the run computed; a LoRA checkpoint holds
the adapters only and resumes to identical weights; in rl the reference is the policy with its
adapters off (KL exactly 0 before the first update, no second copy of the weights in memory);
a bad LoRA config is one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from helpers import ONE_THREAD
from rlhf_cli import data
from rlhf_cli.compose import compose_config
from rlhf_cli.config import DeviceConfig, LoRAConfig, SFTConfig
from rlhf_cli.errors import ConfigError
from rlhf_cli.evaluation import held_out_accuracy
from rlhf_cli.models import load_causal_lm, load_scalar_head_model, load_tokenizer
from rlhf_cli.rollout import make_engine
from rlhf_cli.stages.sft import eval_loss
from rlhf_cli.stages.train_rm import Scorer, evaluate_pairs, tokenize_pairs

QUICK = ["data.num_train=96", "data.num_eval=16", "batch_size=8", "eval.every=1000", "eval.max_new_tokens=8",
         "optim.warmup_steps=0", "optim.min_lr_ratio=1.0", "optim.lr=2e-2", "log_every=1", "checkpoint.every=3",
         "device=cpu", "device.threads=1"]
LORA = ["lora.r=4", "lora.alpha=8"]
