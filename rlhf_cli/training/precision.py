"""How a trainable model computes: weights dtype, autocast, fp16 loss scaling."""

from __future__ import annotations

import os

import torch

from rlhf_cli.errors import ConfigError
from rlhf_cli.training import runtime


def check_trainable_dtype(model_cfg, key: str = "model", device_spec: str | None = "auto") -> None:
    """fp16 trains only as fp32 master weights + fp16 autocast + loss scaling, which needs CUDA."""
    if model_cfg.dtype != "fp16":
        return
    device = runtime.resolve_device(device_spec or "auto", local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.type != "cuda":
        raise ConfigError(f"{key}.dtype=fp16 trains with loss scaling on CUDA only and this run is on {device}; "
                          f"use {key}.dtype=bf16 (or fp32) on CPU")


class Precision:
    """How one trainable model computes, from its dtype key and device.autocast.

    - fp32: fp32 weights; device.autocast=bf16 adds bf16 autocast (fp32 master weights).
    - bf16: bf16 weights and optimizer state, no scaling.
    - fp16: fp32 master weights + fp16 autocast (device.autocast is then ignored) +
      torch.amp.GradScaler, CUDA only (check_trainable_dtype). A step whose scaled
      gradients overflow is skipped by the scaler, which then lowers the scale; it
      does not count as a bad step.
    """

    def __init__(self, dtype: str, autocast_mode: str, device: torch.device):
        self.device = device
        self.weights = "fp32" if dtype == "fp16" else dtype  # load with this dtype
        self.compute = torch.float16 if dtype == "fp16" else torch.bfloat16 if autocast_mode == "bf16" else None
        self.scaler = torch.amp.GradScaler(device.type) if dtype == "fp16" else None

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.compute or torch.bfloat16,
                              enabled=self.compute is not None)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def describe(self) -> str:
        threads = (f"{torch.get_num_threads()} CPU thread(s), OpenMP waits "
                   f"{os.environ.get('OMP_WAIT_POLICY', 'as libgomp defaults').lower()}, ") if self.device.type == "cpu" else ""
        if self.scaler is not None:
            return threads + "fp32 master weights, fp16 autocast, loss scaling"
        return threads + f"{self.weights} weights" + (", bf16 autocast" if self.compute is not None else "")


def frozen_dtype(dtype: str | None, device: torch.device, otherwise: str) -> str:
    """Weights dtype of a model that only runs forwards (reference, reward model): the one set, else
    bf16 on CUDA (half the memory and bandwidth; verl and OpenRLHF keep them in bf16 too), else
    `otherwise` (CPU: bf16 matmuls are slower than fp32 on most CPUs)."""
    if dtype is not None:
        return dtype
    return "bf16" if device.type == "cuda" else otherwise
