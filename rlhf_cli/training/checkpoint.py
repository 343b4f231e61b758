"""Run directories (DESIGN.md §3): lock, config check, atomic checkpoints, final/ with manifest;
the trainer checkpoints that save and resume weights, optimizer and RNG states across ranks.

A checkpoint is complete or invisible: files are written under a temporary
name, fsynced, checksummed in manifest.json and renamed into place. Loading
verifies the checksums and falls back to an older checkpoint when one is
corrupt; pruning (checkpoint.keep_last) never removes the last one that
verifies. Trainer state is read with ``torch.load(weights_only=True)``;
weights are safetensors. A write that fails (disk full) is a one-line error
that leaves the previous checkpoints as they were.

The run dir is locked with an exclusive ``flock`` on ``<run>/.lock`` (pid and
host inside, for the message). The kernel drops it when the process dies, kill
-9 included, so a lock left by a dead run is taken over without a question.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import UserError
from rlhf_cli.training import runtime
from rlhf_cli.training.distributed import full_state_dict, is_sharded, load_full_state_dict, unsharded_copy

# Keys a rerun may change and still resume its run (docs/runs-logging-resume.md): run length and
# cadence, logging, what final/ holds, the learning-rate schedule (its peaks are re-applied on resume,
# loop.resume) and the step guard's thresholds. The weights, the optimizer's moments and the data order
# in a checkpoint stay valid under them. Anything else is another experiment: data, model, batch, seed,
# algorithm, and optim.betas / weight_decay, which the optimizer state restored on resume would override.
SAFE_TO_CHANGE = ("max_steps", "epochs", "log_every", "eval.", "checkpoint.", "device.threads", "data.eval_limit",
                  "logging.", "lora.save", "optim.lr", "optim.warmup_steps", "optim.min_lr_ratio",
                  "optim.max_grad_norm", "optim.max_bad_steps", "optim.max_grad_spike", "optim.max_weight_growth",
                  "critic.lr")
# Keys naming files or directories: a run is identified by what they resolve to, not by how they were written
PATH_KEYS = ("data.train", "data.eval")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def sha256(path: Path) -> str:
    """The file's sha256 hex digest, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Atomically write JSON (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file (temp file, fsync, rename, directory fsync): a reader finds the whole
    file or none; a temp file a killed writer left is removed."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """What write_tensors wrote -> (tensors, metadata); None when the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(config: dict) -> dict:
    """The flat config as it identifies a run: keys naming files (*.path, data.train, data.eval) as the
    resolved absolute path when they exist here, output_dir as its resolved absolute path. The same
    directory written absolute, relative or from another working directory is then the same run."""
    flat = flatten(json.loads(json.dumps(config, default=str)))
    for key, value in flat.items():
        if isinstance(value, str) and value and (key == "output_dir" or key.endswith(".path") or key in PATH_KEYS):
            path = Path(value).expanduser()
            if key == "output_dir" or path.exists():
                flat[key] = str(path.resolve())
    return flat


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _safe(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_TO_CHANGE)


def rerun_changes(root: Path, config: dict) -> tuple[Path | None, dict]:
    """A rerun of `config` in run dir `root`, checked before anything is written: -> (its newest complete
    checkpoint or None, the safe-to-change keys that differ {key: [saved, now]}). Raises UserError
    naming the keys when any other key differs from the run's config.json and there is a checkpoint to
    resume (output_dir is not compared: it is the run's own location)."""
    root = Path(root).expanduser()
    saved_path = root / "config.json"
    ckpt = next(reversed(complete_checkpoints(root / "checkpoints")), None)  # no hash pass: this runs first
    if ckpt is None or not saved_path.exists():
        return None, {}
    try:
        saved = run_identity(json.loads(saved_path.read_text()))
    except (OSError, ValueError):
        saved = {}
    now = run_identity(config)
    # a key only one side has came or went with a version of this tool, not with the user's command
    differ = sorted(k for k in set(saved) & set(now) if k != "output_dir" and saved[k] != now[k])
    refused = [k for k in differ if not _safe(k)]
    if refused:
        shown = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in refused[:6])
        raise UserError(f"{root} holds a run with a different config ({shown}); only run length, cadence, logging "
                        f"and learning-rate keys may change on a rerun (docs/runs-logging-resume.md): use a new "
                        f"output_dir=... or delete the old run")
    return ckpt, {k: [saved[k], now[k]] for k in differ}


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[1])


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """checkpoints/step-N dirs with a manifest (written completely), oldest first."""
    return sorted(p for p in checkpoints.glob("step-*") if (p / "manifest.json").exists())


def latest_checkpoint(checkpoints: Path, warn=None) -> Path | None:
    """The newest complete checkpoint whose checksums hold; corrupt ones are reported and skipped."""
    for ckpt in reversed(complete_checkpoints(checkpoints)):
        if _verify(ckpt):
            return ckpt
        if warn:
            warn(f"checkpoint {ckpt} is corrupt (checksum mismatch); skipping it")
    return None


def _verify(ckpt: Path) -> bool:
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        return all(sha256(ckpt / n) == h for n, h in manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return False


class RunDir:
    """One run's directory: locked while in use, config fixed at creation."""

    def __init__(self, root: str | Path, config: dict, stage: str, is_main: bool = True):
        self.root = Path(root)
        self.stage = stage
        self.is_main = is_main
        self.checkpoints = self.root / "checkpoints"
        self.final = self.root / "final"
        self.lock_path = self.root / ".lock"
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output_dir {self.root} is not writable ({e.strerror}); choose another output_dir=...") from None
        self._lock_fd = None
        self.rejected = self.checkpoints / "rejected"
        self.suspect_from: int | None = None  # the step guard's: checkpoints of earlier steps are trusted
        self.changes: dict = {}  # safe-to-change keys this rerun changed {key: [before, now]}
        if is_main:
            self._lock()  # before the config check: a refused second run must not touch the first one's files
            try:
                self._check_config(config)
            except BaseException:
                self.release()
                raise

    # -- config: a rerun must be the same experiment
    def _check_config(self, config: dict) -> None:
        """Refuse a rerun that changes more than safe-to-change keys (rerun_changes); record the safe ones
        it changed in changes.jsonl with the step they take effect from; save the config (paths resolved)."""
        _, self.changes = rerun_changes(self.root, config)
        ckpt = self.latest() if self.changes else None  # the one resume will load
        if ckpt is None:
            self.changes = {}  # every checkpoint is corrupt: a fresh start
        else:
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": ckpt.name,
                      "from_step": step_of(ckpt) + 1, "changes": self.changes}
            with open(self.root / "changes.jsonl", "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        write_json(self.root / "config.json", unflatten(run_identity(config)))

    def _lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(10):
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(_read_lock(self.lock_path))
            except OSError:  # this filesystem has no flock: fall back to the pid in the file
                os.close(fd)
                return self._lock_by_pid(me)
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(me).encode())
                self._lock_fd = fd
                return
            os.close(fd)
        raise UserError(f"could not lock {self.lock_path}; another run keeps taking it")

    def _lock_by_pid(self, me: dict) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                return
            except FileExistsError:
                other = _read_lock(self.lock_path)
                if other.get("host") == me["host"] and not _pid_alive(other.get("pid", -1)):
                    self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                self._refuse(other)
        self._refuse(_read_lock(self.lock_path))  # another run took the stale lock first

    def _refuse(self, other: dict) -> None:
        raise UserError(f"{self.root} is in use by another run (pid {other.get('pid')} on {other.get('host')}); "
                        f"wait for it or stop it, or choose another output_dir=...") from None

    def release(self) -> None:
        if not self.is_main:
            return
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)  # while still holding it, so nobody locks a removed file
            os.close(self._lock_fd)
            self._lock_fd = None
        elif self.lock_path.exists() and _read_lock(self.lock_path).get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)

    # -- checkpoints
    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int) -> Path:
        """tensors: name -> state dict (saved as NAME.safetensors); state: torch-saveable trainer state."""
        final = self.checkpoints / f"step-{step:06d}"
        tmp = self.checkpoints / f".tmp-step-{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = {}
            for name, sd in tensors.items():
                path = tmp / f"{name}.safetensors"
                save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}, str(path))  # copies untie shared weights
                files[path.name] = path
            state_path = tmp / "trainer_state.pt"
            torch.save(state, state_path)
            files[state_path.name] = state_path
            for path in files.values():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            manifest = {"step": step, "stage": self.stage, "files": {n: sha256(p) for n, p in files.items()}}
            write_json(tmp / "manifest.json", manifest)
            _fsync_dir(tmp)
        except (OSError, RuntimeError, SafetensorError) as e:  # disk full, quota, I/O error: nothing half-written stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not write checkpoint {final} (disk full or over quota? {_free(self.checkpoints)}): "
                            f"{_first_line(e)[:160]}; free space or choose another output_dir=..., then rerun: it "
                            f"resumes from the last complete checkpoint") from None
        old = self.checkpoints / f".tmp-old-{final.name}-{os.getpid()}"
        if final.exists():  # a step redone after resuming from an older checkpoint
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.checkpoints)
        shutil.rmtree(old, ignore_errors=True)
        self._prune(keep_last)
        return final

    def _complete(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints)

    def _prune(self, keep_last: int) -> None:
        """Keep the newest `keep_last` complete checkpoints, and never delete
        - the newest one that verifies: when none of the kept ones does (a corrupt newest with keep_last=1),
          the newest good older one stays;
        - the newest one the step guard trusts (step < suspect_from): a blow-up shows one step after the
          update that caused it, so the newest checkpoint is not trusted yet and the one before it stays."""
        complete = self._complete()
        keep = complete[-keep_last:]
        if not any(self.verify(c) for c in reversed(keep)):  # usually one hash pass over the newest
            keep += [next((c for c in reversed(complete[:-keep_last]) if self.verify(c)), None)]
        if self.suspect_from is not None:
            keep += [next((c for c in reversed(complete) if step_of(c) < self.suspect_from), None)]
        # renamed out of the checkpoint names first: a kill inside rmtree must not leave a manifest beside missing
        # files, a checkpoint that looks complete and fails its checksums (the dead process's .tmp-* is swept below)
        pruned = [(old, self.checkpoints / f".tmp-pruned-{old.name}-{os.getpid()}") for old in complete if old not in keep]
        for old, trash in pruned:
            os.rename(old, trash)
        if pruned:
            _fsync_dir(self.checkpoints)
        for _, trash in pruned:
            shutil.rmtree(trash, ignore_errors=True)
        for tmp in self.checkpoints.glob(".tmp-*"):
            if not tmp.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(tmp, ignore_errors=True)

    def set_aside(self, suspect_from: int) -> tuple[Path | None, list[str]]:
        """After the step guard stopped the run: checkpoints of steps >= suspect_from (they may hold the
        trouble) move to checkpoints/rejected/, kept for a look and never resumed. -> (the checkpoint a
        rerun resumes from (the newest that verifies) or None, the names moved)."""
        moved = [c for c in self._complete() if step_of(c) >= suspect_from]
        if self.is_main:
            for ckpt in moved:
                self.rejected.mkdir(exist_ok=True)
                shutil.rmtree(self.rejected / ckpt.name, ignore_errors=True)
                os.rename(ckpt, self.rejected / ckpt.name)
            _fsync_dir(self.checkpoints)
        return self.latest(), [c.name for c in moved]

    def verify(self, ckpt: Path) -> bool:
        return _verify(ckpt)

    def latest(self, warn=None) -> Path | None:
        """The newest checkpoint whose checksums hold; corrupt ones are reported and skipped."""
        return latest_checkpoint(self.checkpoints, warn)

    @staticmethod
    def load(ckpt: Path, names: list[str], map_location="cpu") -> tuple[dict, dict]:
        """Weights through safetensors; trainer state through torch.load(weights_only=True), which
        refuses anything but tensors and plain containers (no pickled code runs)."""
        missing = [n for n in names if not (ckpt / f"{n}.safetensors").exists()]
        if missing:
            raise UserError(f"checkpoint {ckpt} has no {', '.join(missing)} weights; it was written by another "
                            f"kind of run: use a new output_dir=...")
        tensors = {n: load_file(str(ckpt / f"{n}.safetensors"), device=str(map_location)) for n in names}
        try:
            state = torch.load(ckpt / "trainer_state.pt", map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"checkpoint {ckpt}/trainer_state.pt holds more than tensors and plain data, so "
                            f"safe loading refused it ({_first_line(e)[:120]}); delete {ckpt} to resume from an "
                            f"older checkpoint") from None
        return tensors, state

    # -- final/
    def save_final(self, model, tokenizer, manifest: dict, state_dict: dict | None = None) -> Path:
        """state_dict: the full weights when the model's own are sharded (FSDP2, gathered to rank 0)."""
        for stale in [*self.root.glob(".tmp-final-*"), *self.root.glob(".old-final-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (we hold the lock)
        tmp = self.root / f".tmp-final-{os.getpid()}"
        try:
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
            tokenizer.save_pretrained(tmp)
            write_json(tmp / "manifest.json", manifest)
            _fsync_dir(tmp)
        except (OSError, RuntimeError, SafetensorError) as e:  # disk full: no final/ at all, checkpoints intact
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not write {self.final} (disk full or over quota? {_free(self.root)}): "
                            f"{_first_line(e)[:160]}; free space or choose another output_dir=..., then rerun: it "
                            f"resumes from the last checkpoint") from None
        old = self.root / f".old-final-{os.getpid()}"
        if self.final.exists():
            os.rename(self.final, old)
        os.rename(tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.root)
        return self.final


def _first_line(e: BaseException) -> str:
    text = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else str(e)
    return (text.splitlines() or [type(e).__name__])[0]


def _free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free on that disk"
    except OSError:
        return "free space unknown"


def _read_lock(path: Path) -> dict:
    try:
        other = json.loads(path.read_text())
        return other if isinstance(other, dict) else {}
    except (OSError, ValueError):
        return {}


def lock_holder(root: Path) -> dict | None:
    """The pid/host of a live run holding <root>/.lock, or None (free, stale or absent). Takes no lock."""
    path = Path(root) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_lock(path)
    except OSError:
        other = _read_lock(path)
        return other if other.get("host") == socket.gethostname() and _pid_alive(other.get("pid", -1)) else None
    finally:
        os.close(fd)
    return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_manifest(model_dir: str | Path | None) -> dict:
    if not model_dir:
        return {}
    path = Path(model_dir) / "manifest.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}
    return {}


def fingerprint(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- trainer checkpoints across ranks
# A checkpoint holds full (unsharded) weights and optimizer state, so it reads the same
# whichever strategy wrote it; it is bound to its world size through the RNG state of
# each rank and the global batch (per-device batch x accumulation x world size).


def _optimizer_root(models: dict):
    roots = [m for m, _ in models.values()]
    return roots[0] if len(roots) == 1 else torch.nn.ModuleList(roots)


def save_checkpoint(run_dir, rt: runtime.Runtime, step: int, models: dict, optimizer, scheduler, keep_last: int,
                    precision=None, **extra) -> None:
    """Collective: every rank calls it; rank 0 writes. models: name -> (module, prefix).

    Saves full weights and optimizer state (gathered under FSDP2), the scheduler,
    the RNG state of every rank, the world size and the loss scaler.
    """
    tensors = {name: full_state_dict(m, prefix) for name, (m, prefix) in models.items()}
    if any(is_sharded(m) for m, _ in models.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(_optimizer_root(models), optimizer, options=options)
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
                    precision=None) -> dict:
    """Restore what save_checkpoint wrote (every rank reads the files); -> the trainer state.

    A checkpoint written with another world size is refused with one line: its
    RNG states are per rank and its global batch counts the ranks.
    """
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
            hf_model = unsharded_copy(hf_model, state)
    if rt.is_main:
        run_dir.save_final(hf_model, tokenizer, manifest)
    rt.barrier()
