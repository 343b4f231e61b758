"""Devices, dtypes, seeds and torch.distributed: resolved once per run, passed explicitly."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_cli.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def resolve_device(spec: str | None, default: torch.device | None = None, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists (ConfigError otherwise)."""
    if spec is None:
        return default if default is not None else torch.device("cpu")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} does not exist: {torch.cuda.device_count()} GPU(s) visible (cuda:0..)")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def setup(device_cfg, seed: int) -> Runtime:
    """Init torch.distributed under torchrun (gloo on CPU, nccl on CUDA), pick the device, seed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_cfg.type, local_rank=local_rank)
    if device_cfg.threads:
        torch.set_num_threads(device_cfg.threads)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    seed_everything(seed + rank)
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def autocast(device: torch.device, mode: str):
    """bf16 autocast context (no-op for 'none')."""
    enabled = mode == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
