"""Run directories (DESIGN.md §3): lock, config check, atomic checkpoints, final/ with manifest.

A checkpoint is complete or invisible: files are written under a temporary
name, fsynced, checksummed in manifest.json and renamed into place. Loading
verifies the checksums and falls back to an older checkpoint when one is
corrupt. Trainer state is read with ``torch.load(weights_only=True)``;
weights are safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_cli.errors import UserError

# Keys that may change between a run and its resumption (run length, cadence).
RUN_LENGTH_KEYS = ("max_steps", "epochs", "log_every", "eval.", "checkpoint.", "device.threads", "data.eval_limit")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _sha256(path: Path) -> str:
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


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
        if is_main:
            self._check_config(config)
            self._lock()

    # -- config: a rerun must be the same experiment
    def _check_config(self, config: dict) -> None:
        saved_path = self.root / "config.json"
        if saved_path.exists():
            saved = flatten(json.loads(saved_path.read_text()))
            now = flatten(json.loads(json.dumps(config, default=str)))
            diff = sorted(k for k in set(saved) | set(now)
                          if saved.get(k) != now.get(k) and not any(k == r or k.startswith(r) for r in RUN_LENGTH_KEYS))
            if diff and self.latest() is not None:
                shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
                raise UserError(f"{self.root} holds a run with a different config ({shown}); "
                                f"use a new output_dir=... or delete the old run")
        write_json(saved_path, config)

    def _lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                return
            except FileExistsError:
                try:
                    other = json.loads(self.lock_path.read_text())
                except (OSError, ValueError):
                    other = {}
                if other.get("host") == me["host"] and not _pid_alive(other.get("pid", -1)):
                    self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise UserError(f"{self.root} is in use by another run (pid {other.get('pid')} on {other.get('host')}); "
                                f"wait for it, or delete {self.lock_path} if that run is gone") from None

    def release(self) -> None:
        if self.is_main:
            self.lock_path.unlink(missing_ok=True)

    # -- checkpoints
    def save(self, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep_last: int) -> Path:
        """tensors: name -> state dict (saved as NAME.safetensors); state: torch-saveable trainer state."""
        final = self.checkpoints / f"step-{step:06d}"
        tmp = self.checkpoints / f".tmp-step-{step:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
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
        manifest = {"step": step, "stage": self.stage, "files": {n: _sha256(p) for n, p in files.items()}}
        write_json(tmp / "manifest.json", manifest)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.checkpoints)
        self._prune(keep_last)
        return final

    def _complete(self) -> list[Path]:
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / "manifest.json").exists())

    def _prune(self, keep_last: int) -> None:
        good = self._complete()
        for old in good[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.checkpoints.glob(".tmp-*"):
            if not tmp.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(tmp, ignore_errors=True)

    def verify(self, ckpt: Path) -> bool:
        try:
            manifest = json.loads((ckpt / "manifest.json").read_text())
            return all(_sha256(ckpt / n) == h for n, h in manifest["files"].items())
        except (OSError, ValueError, KeyError):
            return False

    def latest(self, warn=None) -> Path | None:
        """The newest checkpoint whose checksums hold; corrupt ones are reported and skipped."""
        for ckpt in reversed(self._complete()):
            if self.verify(ckpt):
                return ckpt
            if warn:
                warn(f"checkpoint {ckpt} is corrupt (checksum mismatch); skipping it")
        return None

    @staticmethod
    def load(ckpt: Path, names: list[str], map_location="cpu") -> tuple[dict, dict]:
        tensors = {n: load_file(str(ckpt / f"{n}.safetensors"), device=str(map_location)) for n in names}
        state = torch.load(ckpt / "trainer_state.pt", map_location=map_location, weights_only=True)
        return tensors, state

    # -- final/
    def save_final(self, model, tokenizer, manifest: dict) -> Path:
        tmp = self.root / f".tmp-final-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "manifest.json", manifest)
        _fsync_dir(tmp)
        old = self.root / f".old-final-{os.getpid()}"
        if self.final.exists():
            os.rename(self.final, old)
        os.rename(tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.root)
        return self.final


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
