"""Optimizer, learning-rate schedule, and the step guard (clipping; NaN/inf, spikes and blow-ups refused)."""

from __future__ import annotations

import math
import statistics

import torch

from rlhf_cli.errors import UserError


def build_optimizer(params, optim_cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over the parameters that require gradients, or over param groups (dicts) as given.

    The fused kernel (one pass over each tensor for the whole update) where torch has one for every
    parameter's device: on CPU 0.12 s against 0.90 s for the default multi-tensor path on 134.5M fp32
    parameters, one thread (docs/benchmarks.md); the same AdamW math, rounded differently in the last bit."""
    params = list(params)
    if not (params and isinstance(params[0], dict)):
        params = [p for p in params if p.requires_grad]
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    try:  # a private helper of torch's (2.4+); without it, the default multi-tensor path
        from torch.optim.optimizer import _get_fused_kernels_supported_devices as fused_devices
    except ImportError:
        fused_devices = list
    fused = bool(tensors) and all(t.device.type in fused_devices() and t.is_floating_point() for t in tensors)
    return torch.optim.AdamW(params, lr=lr or optim_cfg.lr, betas=tuple(optim_cfg.betas),
                             weight_decay=optim_cfg.weight_decay, fused=fused or None)


def build(params, optim_cfg, total_steps: int):
    """-> (optimizer, scheduler, step guard): what every stage trains with (params: tensors or param groups)."""
    optimizer = build_optimizer(params, optim_cfg)
    return (optimizer, build_scheduler(optimizer, optim_cfg, total_steps),
            StepGuard(optim_cfg.max_grad_norm, optim_cfg.max_bad_steps, optim_cfg.max_grad_spike,
                      optim_cfg.max_weight_growth))


def build_scheduler(optimizer, optim_cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Blowup(UserError):
    """The step guard stopped the run. `suspect_from`: the first step whose update may have caused the
    trouble, so only checkpoints of earlier steps are trusted (loop.run_stage names the newest of them)."""

    def __init__(self, reason: str, step: int, suspect_from: int):
        super().__init__(reason)
        self.reason, self.step, self.suspect_from = reason, step, suspect_from


class StepGuard:
    """Clip gradients (logging the pre-clip norm) and refuse updates that would wreck the weights.

    Three checks, one mechanism for every stage (each calls `step` once per optimizer update):

    - a NaN/inf loss or gradient norm: the update is not applied;
    - a gradient-norm spike: the pre-clip norm is over `max_grad_spike` x the running median of the
      last `SPIKE_WINDOW` applied updates, floored at the clip threshold `max_grad_norm` (1 without
      clipping). A median,
      not a mean or EMA: one earlier outlier does not move it, and it follows the large early
      drift of grad norms within a window. The floor keeps an RL run whose first updates have no
      signal (all advantages 0, grad norm ~0) from calling its first real gradient a spike. It
      starts after `SPIKE_WARMUP` applied updates: fewer are no statistic. Such an update is not
      applied: one bad batch (a corrupt row) must not move the weights. A spike on the next batch
      too says the weights, not a batch, produce it, and skipping cannot mend weights (the model
      stays as it is, so every later batch spikes alike): that update and the spikes after it are
      applied, clipped to `max_grad_norm` like any other (never without clipping). Seen on a suite
      task's SFT (caesar, lr 6e-3): one update sent the loss 2.0 -> 3.0 and every later gradient to
      ~120x its median; refused, five in a row stopped the run; the first clipped update took the
      loss back to 2.0. After `max_bad_steps` spikes in a row (refused or applied) the run stops
      (Blowup): weights that keep producing them through clipped updates are broken;
    - after an applied update, non-finite weights, or a weight norm grown by more than
      `max_weight_growth` x in one update. An absurd learning rate shows here at its very first
      update, before any statistic exists (Adam moves every weight by about lr, whatever the
      gradient), and an LM's grad norm and loss stay bounded while its weights blow up (the softmax
      saturates: with optim.lr=3 on the embedded task the grad norm stayed under 210, never 100x its
      median). Measured on the embedded sft task: the default lr grows the norm by at most 1.02x
      per update, 5x that lr by 1.18x, 17x by 2.3x. The update is applied by then: the run stops at
      once (Blowup) and resumes from a checkpoint taken before it.

    `suspect_from(step)` is the first step that may hold the trouble: the current one (a loss is
    computed on the weights of the previous update, so the newest update is confirmed only by the
    next step's loss), or the step before a streak of refused updates began. Checkpoints of earlier
    steps are trusted: `checkpoint.keep_last` never prunes the newest of them. The grad-norm history
    is part of the checkpoint (state_dict), so a resumed run keeps its statistics.
    """

    SPIKE_WINDOW = 50
    SPIKE_WARMUP = 5

    def __init__(self, max_grad_norm: float | None, max_bad_steps: int = 5, max_grad_spike: float | None = None,
                 max_weight_growth: float | None = None):
        self.max_grad_norm = max_grad_norm
        self.max_bad_steps = max_bad_steps
        self.max_grad_spike = max_grad_spike
        self.max_weight_growth = max_weight_growth
        self.bad_in_a_row = 0
        self.spikes_in_a_row = 0  # grad-norm spikes in the current streak of bad updates
        self.first_bad_step: int | None = None  # the step of the first refused update of the current streak
        self.grad_norms: list[float] = []  # pre-clip norms of the last SPIKE_WINDOW applied updates
        self.weight_norm: float | None = None  # after the last update (None: measure before the next)
        self._norm_of = 0  # ... over this many tensors (a different set is measured afresh)

    def step(self, parameters, optimizer, loss_value: float, scaler=None, at_step: int = 0) -> tuple[float, bool]:
        """One update (of stage step `at_step`, 1-based) -> (pre-clip grad norm, applied).

        scaler: a torch.amp.GradScaler (fp16): gradients are unscaled before clipping, and an
        overflow is the scaler's business (it skips the step and lowers the scale), not a bad step."""
        params = [p for p in parameters if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm is not None else float("inf")
        if scaler is not None and params:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else 0.0
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        if scaler is not None and params and math.isfinite(loss_value) and not math.isfinite(grad_norm):
            scaler.step(optimizer)  # an fp16 overflow: the scaler skips the step and lowers its scale
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row, self.spikes_in_a_row, self.first_bad_step = 0, 0, None
            return grad_norm, False
        problem, spike = self._problem(loss_value, grad_norm)
        if problem:
            self._count_bad(problem, spike, at_step)
            if not (spike and self.spikes_in_a_row > 1 and self.max_grad_norm is not None):
                if scaler is not None and params:
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                return grad_norm, False
            # the weights produce the spike (the batch before spiked too): apply it clipped, keep counting
        before = self.weight_norm if self._norm_of == len(params) else None  # measured after the previous update
        if self.max_weight_growth is not None and before is None:
            before = self._weight_norm(params)
        if scaler is not None and params:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._check_weights(params, before, at_step)
        if not problem:
            self.bad_in_a_row, self.spikes_in_a_row, self.first_bad_step = 0, 0, None
        self.grad_norms = (self.grad_norms + [grad_norm])[-self.SPIKE_WINDOW:]
        return grad_norm, True

    def _problem(self, loss_value: float, grad_norm: float) -> tuple[str | None, bool]:
        """(what is wrong with this update or None, whether it is a grad-norm spike)."""
        if not (math.isfinite(grad_norm) and math.isfinite(loss_value)):
            return "a NaN/inf loss or gradient", False
        if self.max_grad_spike is None or len(self.grad_norms) < self.SPIKE_WARMUP:
            return None, False
        typical = max(statistics.median(self.grad_norms), self.max_grad_norm or 1.0)
        if grad_norm > self.max_grad_spike * typical:
            return (f"a gradient norm over optim.max_grad_spike={self.max_grad_spike:g} x its running median "
                    f"({grad_norm:.3g} vs {typical:.3g})"), True
        return None, False

    def _count_bad(self, problem: str, spike: bool, at_step: int) -> None:
        """Count a bad update (a grad-norm spike when `spike`: the second in a row on is applied clipped);
        stop (Blowup) at max_bad_steps in a row."""
        self.spikes_in_a_row = self.spikes_in_a_row + 1 if spike else 0
        self.bad_in_a_row += 1
        self.first_bad_step = at_step if self.first_bad_step is None else self.first_bad_step
        if self.bad_in_a_row >= self.max_bad_steps:
            how = ("were skipped" if self.spikes_in_a_row <= 1 or self.max_grad_norm is None else
                   f"were skipped once, then applied clipped to optim.max_grad_norm={self.max_grad_norm:g}")
            raise Blowup(f"{self.bad_in_a_row} updates in a row had {problem} and {how} "
                         f"(optim.max_bad_steps={self.max_bad_steps})", at_step, self.suspect_from(at_step))

    def _check_weights(self, params: list, before: float, at_step: int) -> None:
        """After an applied update: non-finite weights, or a norm grown past max_weight_growth x -> Blowup."""
        if self.max_weight_growth is None:
            return
        after = self._weight_norm(params)
        self.weight_norm, self._norm_of = after, len(params)
        if not math.isfinite(after):
            raise Blowup("an update left non-finite weights", at_step, at_step)
        if before > 0 and after > self.max_weight_growth * before:
            raise Blowup(f"an update grew the weight norm {after / before:.3g}x at once "
                         f"({before:.3g} -> {after:.3g}; optim.max_weight_growth={self.max_weight_growth:g})",
                         at_step, at_step)

    @staticmethod
    def _weight_norm(params: list) -> float:
        """The global L2 norm of the trained weights (one read of them; FSDP2: of every rank's shards)."""
        if not params:
            return 0.0
        norm = torch.nn.utils.get_total_norm([p.detach() for p in params])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def suspect_from(self, step: int) -> int:
        """After step `step` (1-based): the first step that may hold trouble not detected yet."""
        return step if self.first_bad_step is None else min(step, self.first_bad_step - 1)

    def state_dict(self) -> dict:
        return {"grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.grad_norms = [float(x) for x in state.get("grad_norms", [])]
