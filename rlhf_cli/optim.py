"""Optimizer, learning-rate schedule, and the step guard (clipping, NaN/inf refusal)."""

from __future__ import annotations

import math

import torch

from rlhf_cli.errors import UserError


def build_optimizer(params, optim_cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients, or over param groups (dicts) as given."""
    params = list(params)
    if not (params and isinstance(params[0], dict)):
        params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr or optim_cfg.lr, betas=tuple(optim_cfg.betas),
                             weight_decay=optim_cfg.weight_decay)


def build(params, optim_cfg, total_steps: int):
    """-> (optimizer, scheduler, step guard): what every stage trains with (params: tensors or param groups)."""
    optimizer = build_optimizer(params, optim_cfg)
    return (optimizer, build_scheduler(optimizer, optim_cfg, total_steps),
            StepGuard(optim_cfg.max_grad_norm, optim_cfg.max_bad_steps))


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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

    def step(self, parameters, optimizer, loss_value: float, scaler=None) -> tuple[float, bool]:
        """scaler: a torch.amp.GradScaler (fp16): gradients are unscaled before clipping, and an
        overflow is the scaler's business (it skips the step and lowers the scale), not a bad step."""
        params = [p for p in parameters if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        if scaler is not None and params:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else 0.0
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if scaler is not None and params:
            if math.isfinite(loss_value):
                scaler.step(optimizer)  # skipped inside when the unscaled gradients hold inf/NaN
            scaler.update()
            if math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                self.bad_in_a_row = 0
                return grad_norm, math.isfinite(grad_norm)
        if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
            optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.max_bad_steps:
                raise UserError(f"{self.bad_in_a_row} updates in a row had a NaN/inf loss or gradient and were skipped "
                                f"(optim.max_bad_steps={self.max_bad_steps}); stopped, the last good checkpoint is kept: "
                                f"lower optim.lr, or check the data, model weights and reward functions")
            return grad_norm, False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row = 0
        return grad_norm, True
