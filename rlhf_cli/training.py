"""Plumbing the stage runners share: model paths, optimizer + schedule, DDP wrapping,
gradient steps with clipping and NaN guards, checkpoint state, held-out accuracy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from rlhf_cli import embedded, runtime
from rlhf_cli.errors import ConfigError, UserError


def model_path(model_cfg, run_root: Path, seed: int, rt: runtime.Runtime) -> str:
    """model.path, or the embedded tiny model written once into <run>/base (same from_pretrained path)."""
    if model_cfg.path:
        return str(model_cfg.path)
    base = Path(run_root) / "base"
    if rt.is_main:
        embedded.write_embedded_base(base, seed)
    rt.barrier()
    return str(base)


def check_trainable_dtype(model_cfg, key: str = "model") -> None:
    if model_cfg.dtype == "fp16":
        raise ConfigError(f"{key}.dtype=fp16 cannot be trained without fp32 master weights; "
                          f"use {key}.dtype=bf16, or fp32 weights with device.autocast=bf16")


def build_optimizer(params, optim_cfg, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr or optim_cfg.lr, betas=tuple(optim_cfg.betas),
                             weight_decay=optim_cfg.weight_decay)


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_ddp(model, rt: runtime.Runtime):
    """DDP across ranks (gloo on CPU, nccl on CUDA); the model itself when on one process."""
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


class StepGuard:
    """Clip gradients (logging the pre-clip norm) and refuse non-finite steps.

    A step whose loss or gradient norm is NaN/inf is not applied; after
    `max_bad_steps` such steps in a row the run stops with a clear message
    (the last good checkpoint stays).
    """

    def __init__(self, max_grad_norm: float | None, max_bad_steps: int = 5):
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row = 0

    def step(self, parameters, optimizer, loss_value: float) -> tuple[float, bool]:
        params = [p for p in parameters if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
            optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise UserError(f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient; "
                                f"stopped (lower optim.lr, or check the data); the last good checkpoint is kept")
            return grad_norm, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row = 0
        return grad_norm, True


def trainer_state(step: int, optimizer, scheduler, **extra) -> dict:
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": runtime.rng_state(), **extra}


def restore_trainer_state(state: dict, optimizer, scheduler) -> int:
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    runtime.set_rng_state(state["rng"])
    return int(state["step"])


DEFAULT_RULE = "rlhf_cli.task:correctness_reward"


def held_out_accuracy(model, tokenizer, rows: list[dict], prompts: list[str], eval_cfg, device
                      ) -> tuple[float | None, list[tuple[str, str, str]], float, list[str]]:
    """Greedy generation on held-out prompts checked by eval.rule (the task's rule by default).

    Returns (accuracy, or None when there is no rule or the default rule has no
    `answer` column to check; sample rows; mean response chars; the responses).
    """
    from rlhf_cli.modeling import generate_texts
    from rlhf_cli.rewards import call_reward, import_reward_function

    responses = generate_texts(model, tokenizer, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, device)
    rule = eval_cfg.rule
    if rule == DEFAULT_RULE and not all("answer" in r for r in rows):
        rule = None
    checks = []
    if rule:
        fn = import_reward_function(rule, "eval.rule")
        checks = [call_reward(fn, rule, p, resp, r) for p, resp, r in zip(prompts, responses, rows)]
    accuracy = sum(checks) / len(checks) if checks else None
    samples = [(p, resp, ("right" if c else "wrong") if checks else "")
               for p, resp, c in zip(prompts, responses, checks or [None] * len(prompts))][: eval_cfg.show_samples]
    mean_len = sum(len(r) for r in responses) / max(1, len(responses))
    return accuracy, samples, mean_len, responses


class Throughput:
    def __init__(self):
        self.t = time.perf_counter()

    def rate(self, count: float) -> float:
        now = time.perf_counter()
        rate = count / max(1e-9, now - self.t)
        self.t = now
        return rate
