"""SIGTERM and SIGINT (what SLURM preemption and Ctrl-C send): stop at a step boundary, lose nothing.

    rlhf sft ...        # Ctrl-C, `kill -TERM <pid>` or SLURM's preemption signal arrives:
                        #   the current step finishes, a checkpoint is written, one line on stderr:
                        #   stopped by SIGTERM after step 7 of 600 (checkpoint runs/sft/checkpoints/step-000007);
                        #   resume with the same command: rlhf sft ...
                        #   and the exit code is 143 (SIGTERM) or 130 (SIGINT): 128 + the signal number.
    rlhf sft ...        # the same command resumes at step 7

A second Ctrl-C stops at once, without a new checkpoint (the last complete one
stays, so rerunning still resumes). Under torchrun every rank sees the stop at
the same step (the flag is all-reduced at each step boundary).

Exit codes of `rlhf`: 0 done; 2 a problem the user can fix (one `error:` line);
130 / 143 stopped by SIGINT / SIGTERM, resumable; anything else is a bug.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, the shell convention

INTERRUPTED_OUTSIDE_STEPS = ("stopped by SIGINT outside a training step (no step was cut short); rerun the same "
                             "command to start, or to resume a run that has a checkpoint")

_requested: int | None = None
_command: str | None = None


class Interrupted(BaseException):
    """Raised after a stop signal once the checkpoint is written. A BaseException (like
    KeyboardInterrupt) so that no `except Exception` on the way turns it into an error."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_CODES.get(signum, 128 + int(signum))


def remember_command(stage: str, args: list[str]) -> None:
    """The user's command line, for the resume hint (rlhf, python -m rlhf_cli or torchrun)."""
    global _command
    if os.environ.get("TORCHELASTIC_RUN_ID") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        prog = "torchrun [its options as before] -m rlhf_cli"
    elif os.path.basename(sys.argv[0]) == "__main__.py":
        prog = "python -m rlhf_cli"
    else:
        prog = "rlhf"
    _command = f"{prog} {shlex.join([stage, *args])}"


def resume_command() -> str:
    return _command or "the command that started this run"


def exit_at_once_on_sigint() -> None:
    """Ctrl-C while no run holds the step-boundary handler (start-up: importing torch, composing the config;
    a tool's work) prints one line and exits 130 at once, from the handler: a KeyboardInterrupt raised
    inside an import or a C++ extension's start-up comes out as another library's error, or an abort.
    Left alone where the shell started us with SIGINT ignored (a background job)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_now)


def _exit_now(signum, frame) -> None:
    try:
        sys.stdout.flush()
    finally:
        print(INTERRUPTED_OUTSIDE_STEPS, file=sys.stderr, flush=True)
        os._exit(EXIT_CODES[signal.SIGINT])


def _on_signal(signum, frame) -> None:
    global _requested
    if _requested == signal.SIGINT and signum == signal.SIGINT:  # Ctrl-C twice: stop now
        raise Interrupted(signum, "stopped by a second SIGINT without a new checkpoint; the last complete "
                                  f"checkpoint resumes with the same command: {resume_command()}")
    _requested = _requested or signum


@contextlib.contextmanager
def stop_at_step_boundary():
    """Install the SIGTERM / SIGINT handlers for the duration of a run (main thread only)."""
    global _requested
    _requested = None
    previous = {s: signal.signal(s, _on_signal) for s in EXIT_CODES}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def stop_requested(rt=None) -> int | None:
    """The stop signal's number, or None. Call at a step boundary: under torch.distributed it is a
    collective (every rank must call it), so all ranks stop after the same step."""
    signum = int(_requested or 0)
    if rt is not None and rt.distributed:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([signum], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=getattr(rt, "group", None))
        signum = int(flag.item())
    return signum or None


def stopped(signum: int, step: int, total_steps: int, run_dir) -> Interrupted:
    """The exception a stage raises once the checkpoint of `step` is written."""
    name = signal.Signals(signum).name
    ckpt = run_dir.checkpoints / f"step-{step:06d}"
    return Interrupted(signum, f"stopped by {name} after step {step} of {total_steps} (checkpoint {ckpt}); "
                               f"resume with the same command: {resume_command()}")
