"""Past one process: DDP / FSDP2 wrapping, gathering sharded weights, statistics over every rank.

On one process every function here is the identity or the plain single-process
computation, so a stage runs the same code with or without torchrun.
"""

from __future__ import annotations

import contextlib
import math

import torch

from rlhf_cli.algorithms import RunningMean, explained_variance, masked_whiten
from rlhf_cli.training import runtime


def wrap_model(model, rt: runtime.Runtime, strategy: str = "ddp"):
    """Under torchrun: DDP (a replica per rank, gradients all-reduced) or FSDP2 (`fully_shard`:
    parameters, gradients and optimizer state sharded over ranks). On one process: the model.

    FSDP2 shards in place: every transformer block (the classes in the model's
    `_no_split_modules`) is one unit, the root holds the rest (embeddings, head).
    Build the optimizer AFTER this call (its parameters become DTensors). DDP
    returns a wrapper; call the wrapper's forward so gradients are synchronised.
    """
    if not rt.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if rt.mesh is None:  # one mesh for every sharded model (gradient norms combine across them)
            rt.mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        mesh = rt.mesh
        block_names = set()
        for module in model.modules():
            block_names.update(getattr(module, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module, mesh=mesh)
        # the root reshards after forward too (FSDP2 keeps it gathered by default): one more all-gather
        # of embeddings + head per step, but a known state for `gathered` to restore, and less memory
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device  # rl may place the critic apart from the policy
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=rt.group)  # async rl: among the learner ranks


def shard_frozen(model, rt: runtime.Runtime, strategy: str = "ddp"):
    """A model that only runs forwards (reference, reward model) under torchrun: sharded like the
    policy under FSDP2 (each rank holds 1/world of it; a forward gathers one block at a time), so a
    run whose four models do not fit one GPU fits several. Under DDP (or one process) it stays a
    full replica: there are no gradients to synchronise. Every rank must then run the same number
    of forwards on it (the rl stage's scoring does: equal rows per rank)."""
    if not rt.distributed or strategy != "fsdp" or model is None or not isinstance(model, torch.nn.Module):
        return model
    return wrap_model(model, rt, strategy)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_sync(model, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches (DDP no_sync / FSDP2 requires_gradient_sync)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if is_sharded(model):
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return fsdp_no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model):
    """FSDP2: hold the full parameters for a stretch of forwards whose number differs across ranks
    (sampling that stops when every row has stopped, rank-0-only evaluation). A no-op otherwise.
    Costs the memory of the full model on every rank for that stretch."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)
            unit.reshard()


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's full state dict (collective under FSDP2; there only rank 0 gets the tensors).
    `prefix`: keep only keys under it, with it removed (e.g. 'model.' of a wrapper module)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_state_options())
    else:
        state = unwrap(model).state_dict()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_full_state_dict(model, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    state = {prefix + k: v for k, v in state.items()}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        unwrap(model).load_state_dict(state)


def unsharded_copy(hf_model, state: dict[str, torch.Tensor]):
    """A plain module of hf_model's class holding `state` (built on the meta device, then assigned:
    no second copy of the weights). Saving the sharded module itself would run collectives on rank 0 only."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(hf_model).__mro__ if not issubclass(c, FSDPModule))  # FSDPLlama... -> Llama...
    with torch.device("meta"):
        copy = cls(hf_model.config)
    copy.load_state_dict(state, assign=True)
    copy.tie_weights()
    if getattr(hf_model, "generation_config", None) is not None:
        copy.generation_config = hf_model.generation_config
    return copy


# ---------------------------------------------------------------- statistics over every rank


class GlobalRunningMean:
    """RunningMean whose update folds in every rank's values (sum and count all-reduced), so the
    'mean' REINFORCE baseline is the same on every rank and equals the one-process value."""

    def __init__(self, rt: runtime.Runtime):
        self.rt = rt
        self.inner = RunningMean()

    @property
    def value(self) -> float:
        return self.inner.value

    @property
    def count(self) -> int:
        return self.inner.count

    def update(self, values) -> float:
        values = torch.as_tensor(values).detach().reshape(-1).double()
        total, n = self.rt.sum(float(values.sum()), values.numel())
        if n == 0:
            return self.inner.value
        self.inner.value = (self.inner.value * self.inner.count + total) / (self.inner.count + n)
        self.inner.count += int(n)
        return self.inner.value

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def global_masked_whiten(x: torch.Tensor, mask: torch.Tensor, rt: runtime.Runtime, eps: float = 1e-8) -> torch.Tensor:
    """algorithms.masked_whiten with the mean and (unbiased) variance over the real tokens of
    every rank's rows: whitening the global batch, as one process would (two all-reduces)."""
    if not rt.distributed:
        return masked_whiten(x, mask, eps=eps)
    real = mask.bool() if mask.dtype != torch.bool else mask
    xr = torch.where(real, x, torch.zeros((), dtype=x.dtype, device=x.device)).double()
    total, count = rt.sum(float(xr.sum()), float(real.sum()))
    mean = total / max(count, 1.0)
    (sq,) = rt.sum(float((torch.where(real, xr - mean, torch.zeros_like(xr)) ** 2).sum()))
    variance = sq / max(count, 1.0) * count / max(count - 1, 1.0)
    whitened = (x - mean) * (1.0 / math.sqrt(variance + eps))
    return torch.where(real, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                              rt: runtime.Runtime) -> float:
    """algorithms.explained_variance, 1 - Var(R - V) / Var(R), over the real tokens of every rank."""
    if not rt.distributed:
        return float(explained_variance(values, returns, mask))
    real = mask.bool() if mask.dtype != torch.bool else mask
    y = returns.detach().double()[real]
    d = y - values.detach().double()[real]
    n, sy, syy, sd, sdd = rt.sum(y.numel(), y.sum(), (y * y).sum(), d.sum(), (d * d).sum())
    n = max(n, 1.0)
    var_y, var_d = syy / n - (sy / n) ** 2, sdd / n - (sd / n) ** 2
    return 1 - var_d / var_y if var_y > 0 else float("nan")
