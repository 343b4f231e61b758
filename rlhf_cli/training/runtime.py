"""Devices, dtypes, seeds and torch.distributed: resolved once per run, passed explicitly.

    rlhf rl device=cpu                                         # one process
    torchrun --nproc-per-node 2 -m rlhf_cli rl device=cpu      # two ranks, gloo
    torchrun --nproc-per-node 8 -m rlhf_cli rl device=cuda     # eight GPUs, nccl

Every device a run uses (the run's own, and for rl the placement of each model)
is resolved in :func:`setup` before torch.distributed starts and before any
model loads, so a device that does not exist is a one-line error.
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rlhf_cli.errors import ConfigError

_gloo_started = False  # a gloo process group ran in this process: end it with exit_process (below)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PLACED_MODELS = ("policy", "reference", "reward", "critic")


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    placement: dict[str, torch.device] = field(default_factory=dict)  # rl: model name -> device
    mesh: object = None  # the FSDP2 DeviceMesh, made once by distributed.wrap_model
    group: object = None  # the process group of the collectives (None: every rank; async rl: the learners')

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place, summed over ranks (a no-op on one process). Gloo reduces CPU tensors, nccl CUDA ones."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sum(self, *values: float) -> list[float]:
        """Python numbers summed over ranks, in float64 (one collective for all of them)."""
        if not self.distributed:
            return [float(v) for v in values]
        backend_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=backend_device)
        return self.all_reduce_sum(tensor).tolist()

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on one process)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


def resolve_device(spec: str | None, default: torch.device | None = None, local_rank: int = 0,
                   key: str = "device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists (ConfigError naming `key` otherwise).

    'cuda' means cuda:LOCAL_RANK (each torchrun process its own GPU); 'cuda:N' is absolute.
    """
    if spec is None:
        return default if default is not None else torch.device("cpu")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={spec} asked for but no CUDA GPU is visible; use device=cpu or device=auto")
        try:
            index = int(spec.split(":", 1)[1]) if ":" in spec else local_rank
        except ValueError:
            raise ConfigError(f"{key}={spec!r} is not cuda:N with N a GPU index; e.g. {key}=cuda:0") from None
        count = torch.cuda.device_count()
        if index >= count:
            why = f" (local rank {local_rank} of this node)" if ":" not in spec else ""
            raise ConfigError(f"{key}={spec}{why} does not exist: {count} GPU(s) visible (cuda:0..cuda:{count - 1}); "
                              f"use fewer processes per node or another device")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown {key} {spec!r}; use auto, cpu, cuda or cuda:N")


def resolve_placement(placement_cfg, device: torch.device, local_rank: int, world_size: int) -> dict[str, torch.device]:
    """rl's per-model devices: policy defaults to the run's device, the others to the policy's."""
    spec = {name: getattr(placement_cfg, name, None) for name in PLACED_MODELS}
    if world_size > 1 and spec["policy"] and spec["policy"].startswith("cuda:"):
        raise ConfigError(f"placement.policy={spec['policy']} would put every torchrun rank's policy on one GPU; "
                          f"leave placement.policy=null (rank r uses cuda:LOCAL_RANK)")
    policy = resolve_device(spec["policy"], device, local_rank, "placement.policy")
    placed = {"policy": policy}
    for name in PLACED_MODELS[1:]:
        placed[name] = resolve_device(spec[name], policy, local_rank, f"placement.{name}")
    return placed


def setup(device_cfg, seed: int, placement_cfg=None) -> Runtime:
    """Resolve every device (a one-line error before anything loads), then init torch.distributed
    under torchrun (gloo on CPU, nccl on CUDA) and seed every generator with seed + rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_cfg.type, local_rank=local_rank, key="device")
    placement = resolve_placement(placement_cfg, device, local_rank, world_size) if placement_cfg is not None else {}
    if device_cfg.threads:
        torch.set_num_threads(device_cfg.threads)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        global _gloo_started
        _gloo_started = _gloo_started or backend == "gloo"
    seed_everything(seed + rank)  # dropout differs per rank; data order and rollout noise are keyed globally
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank, placement=placement)


def teardown() -> None:
    """Close the process group setup() opened under torchrun. Where vLLM runs in the process
    (rollout.engine=vllm) it is left to vLLM: its engine's exit hook destroys its own groups, built on
    the default one, and fails with "Invalid process group" if that one is gone (seen under torchrun);
    in one process the only group is vLLM's own."""
    if dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "vllm" not in sys.modules:
        if _gloo_started:  # gloo's groups stay alive until exit_process ends the process: see there
            return
        dist.destroy_process_group()


def exit_process(code) -> None:
    """Where a gloo process group ran: flush stdout and stderr, then end the process with `code` at once
    (os._exit), skipping the interpreter's finalization; elsewhere return, and the caller exits as usual.

    Why: gloo's worker threads free each finished collective's work object after the caller saw it done,
    and that drops references to Python tensors, which takes the GIL. A rank that reaches finalization
    first (its last barrier done, nothing else to do) makes such a thread exit inside a noexcept
    destructor: "terminate called without an active exception", SIGABRT, and torchrun fails a run that
    had written everything (seen 1 in ~12 two-rank fsdp sft runs under load; core: ProcessGroupGloo::
    runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherCoalescedWork -> decref -> take_gil -> pthread_exit;
    the same race as pytorch/pytorch#179291). The same worker deadlocks the process if the main thread frees
    the last reference to a gloo group while it holds the GIL (~ProcessGroupGloo joins a worker waiting for the
    GIL; seen when DDP's reducer was freed after destroy_process_group: a 2-step rl run hung after its table),
    so teardown does not destroy gloo groups: they live until os._exit. Every file, checkpoint and tracker is
    closed by then; nothing of ours is left to finalization. Not where vLLM runs in the process: its exit
    hooks (its process groups, an engine process of its own) must run."""
    if not _gloo_started or "vllm" in sys.modules:
        return
    if code is None:
        code = 0
    elif not isinstance(code, int):  # SystemExit("message"): printed to stderr, exit 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def keyed_uniform(seed: int, step: int, first_row: int, rows: int, width: int, device=None) -> torch.Tensor:
    """(rows, width) uniforms in [0, 1); row i comes from its own generator keyed by
    (seed, step, first_row + i), so a row's noise does not depend on which rank holds it.

    RL sampling draws token t of global rollout row g with u[g, t]: rank r holds rows
    r*B..(r+1)*B-1 of the step's global batch, so every rank samples differently, a
    rerun (or a resume) samples the same, and 2 ranks x B rows draw exactly what
    1 rank x 2B rows draws. Cost: one tiny generator per row per step.
    """
    out = torch.empty(rows, width, dtype=torch.float64)
    for i in range(rows):
        key = ((seed * 1_000_003 + step) * 1_000_003 + first_row + i) % (2**63 - 1)
        out[i] = torch.rand(width, generator=torch.Generator().manual_seed(key), dtype=torch.float64)
    return out.to(device) if device is not None else out
