"""Plumbing the stage runners share: model paths, precision (dtype, autocast, loss scaling),
DDP / FSDP2 wrapping, gradient steps with clipping and NaN guards, checkpoints that
save and resume across ranks, global (all-rank) statistics, held-out accuracy."""

from __future__ import annotations

import contextlib
import math
import os
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
        if self.scaler is not None:
            return "fp32 master weights, fp16 autocast, loss scaling"
        return f"{self.weights} weights" + (", bf16 autocast" if self.compute is not None else "")


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
    return wrap_model(model, rt, "ddp")


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
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_sync(model, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-batches (DDP no_sync / FSDP2 requires_gradient_sync)."""
    import contextlib

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


# ---------------------------------------------------------------- checkpoints across ranks
# A checkpoint holds full (unsharded) weights and optimizer state, so it reads the same
# whichever strategy wrote it; it is bound to its world size through the RNG state of
# each rank and the global batch (per-device batch x accumulation x world size).


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


def _optimizer_root(models: dict):
    roots = [m for m, _ in models.values()]
    return roots[0] if len(roots) == 1 else torch.nn.ModuleList(roots)


def save_checkpoint(run_dir, rt: runtime.Runtime, step: int, models: dict, optimizer, scheduler, keep_last: int,
                    precision: Precision | None = None, **extra) -> None:
    """Collective: every rank calls it; rank 0 writes. models: name -> (module, prefix).

    Saves full weights and optimizer state (gathered under FSDP2), the scheduler,
    the RNG state of every rank, the world size and the loss scaler.
    """
    tensors = {name: full_state_dict(m, prefix) for name, (m, prefix) in models.items()}
    if any(is_sharded(m) for m, _ in models.values()):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(_optimizer_root(models), optimizer, options=_full_state_options())
    else:
        optim_state = optimizer.state_dict()
    rng_per_rank = rt.all_gather_object(runtime.rng_state())
    if rt.is_main:
        state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank, "world_size": rt.world_size, **extra}
        if precision is not None and precision.scaler is not None:
            state["grad_scaler"] = precision.scaler.state_dict()
        run_dir.save(step, tensors, state, keep_last)
    rt.barrier()


def load_checkpoint(ckpt: Path, rt: runtime.Runtime, models: dict, optimizer, scheduler,
                    precision: Precision | None = None) -> dict:
    """Restore what save_checkpoint wrote (every rank reads the files); -> the trainer state.

    A checkpoint written with another world size is refused with one line: its
    RNG states are per rank and its global batch counts the ranks.
    """
    from rlhf_cli.checkpoint import RunDir

    tensors, state = RunDir.load(ckpt, list(models))
    saved = int(state.get("world_size", 1))
    if saved != rt.world_size:
        raise UserError(f"{ckpt} was written by a run of {saved} process(es) and this run has {rt.world_size}: "
                        f"resume it with {saved} (torchrun --nproc-per-node ... so that nodes x processes = {saved}), "
                        f"or start a new output_dir=... (a checkpoint holds each rank's RNG state and its global "
                        f"batch counts the ranks)")
    for name, (module, prefix) in models.items():
        load_full_state_dict(module, tensors[name], prefix)
    if any(is_sharded(m) for m, _ in models.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(_optimizer_root(models), optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    runtime.set_rng_state(state.get("rng_per_rank", [state["rng"]])[rt.rank])
    if precision is not None and precision.scaler is not None and "grad_scaler" in state:
        precision.scaler.load_state_dict(state["grad_scaler"])
    return state


def save_final(run_dir, rt: runtime.Runtime, model, tokenizer, manifest: dict, prefix: str = "", hf_model=None):
    """Collective: gathers the full weights (FSDP2), rank 0 writes final/ (a plain HF model dir).

    model: the (possibly sharded) root; hf_model: the Hugging Face model inside it under `prefix`.
    """
    hf_model = hf_model if hf_model is not None else model
    if is_sharded(model):
        state = full_state_dict(model, prefix)  # collective; the tensors land on rank 0 (CPU)
        if rt.is_main:
            hf_model = _unsharded_copy(hf_model, state)
    if rt.is_main:
        run_dir.save_final(hf_model, tokenizer, manifest)
    rt.barrier()


def _unsharded_copy(hf_model, state: dict[str, torch.Tensor]):
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
        from rlhf_cli.algorithms import RunningMean

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
    from rlhf_cli.algorithms import masked_whiten

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
    from rlhf_cli.algorithms import explained_variance

    if not rt.distributed:
        return float(explained_variance(values, returns, mask))
    real = mask.bool() if mask.dtype != torch.bool else mask
    y = returns.detach().double()[real]
    d = y - values.detach().double()[real]
    n, sy, syy, sd, sdd = rt.sum(y.numel(), y.sum(), (y * y).sum(), d.sum(), (d * d).sum())
    n = max(n, 1.0)
    var_y, var_d = syy / n - (sy / n) ** 2, sdd / n - (sd / n) ** 2
    return 1 - var_d / var_y if var_y > 0 else float("nan")


DEFAULT_RULE = "rlhf_cli.task:correctness_reward"


def held_out_accuracy(model, tokenizer, rows: list[dict], prompts: list[str], eval_cfg, device, engine: str = "auto"
                      ) -> tuple[float | None, list[tuple[str, str, str]], float, list[str]]:
    """Greedy generation (decoding.py's `engine`) on held-out prompts checked by eval.rule (the task's rule
    by default).

    Returns (accuracy, or None when there is no rule or the default rule has no
    `answer` column to check; sample rows; mean response chars; the responses).
    """
    from rlhf_cli.modeling import generate_texts
    from rlhf_cli.rewards import call_reward, import_reward_function

    responses = generate_texts(model, tokenizer, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, device, engine)
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
