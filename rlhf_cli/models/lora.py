"""LoRA for every stage through peft: adapters on the loaded model, checkpoints of the
trainable tensors only, final/ merged or as an adapter, and the RL reference as the policy
with its adapters off.

    rlhf sft lora.r=8                                    # adapters on every linear layer; final/ merged
    rlhf sft lora.r=8 lora.save=adapter                  # final/ = adapter + tokenizer + manifest
    rlhf train-rm model.path=runs/sft/final lora.r=8     # the score head trains in full (modules_to_save)
    rlhf rl policy.path=runs/sft/final lora.r=8          # reference = the policy with adapters off, no copy

peft injects its layers into the loaded Hugging Face model in place, so a stage keeps
training the module it loaded (forward, DDP, sampling and evaluation are unchanged). This
module holds what differs: which tensors train and are checkpointed, what final/ holds,
the adapters-off reference, and loading an adapter dir (adapter_config.json, no
config.json) wherever a model path is read: its base with the adapter merged in.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from rlhf_cli.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"


# ---------------------------------------------------------------- adapter dirs as model paths


def is_adapter_dir(path) -> bool:
    """A peft adapter dir (a `lora.save=adapter` final/), not a full model dir."""
    p = Path(str(path)).expanduser()
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(path, key: str) -> str:
    """The base model an adapter dir trained on: its adapter_config.json's base_model_name_or_path."""
    p = Path(str(path)).expanduser()
    try:
        base = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {p / ADAPTER_CONFIG} does not read as JSON ({e}); point {key} at another model") from None
    if not base:
        raise UserError(f"{key}: the LoRA adapter {path} names no base model (base_model_name_or_path in "
                        f"{ADAPTER_CONFIG}); write the base model's dir there")
    if not Path(base).expanduser().exists() and (p / base).exists():  # a relative base next to the adapter
        return str(p / base)
    if Path(base).is_absolute() and not Path(base).exists():
        raise UserError(f"{key}: {path} is a LoRA adapter over {base}, which does not exist; restore that model dir "
                        f"or edit base_model_name_or_path in {p / ADAPTER_CONFIG}")
    return base


def load_merged(path, key: str, load_base):
    """An adapter dir as one plain model: load_base(base path) -> the HF model, then the adapter merged into it.

    Every weight is trainable again afterwards, as after a plain from_pretrained (peft freezes the base).
    """
    from peft import PeftConfig, PeftModel

    model = load_base(adapter_base(path, key))
    try:
        config = PeftConfig.from_pretrained(str(path))
        config.task_type = None  # merged at once: no task wrapper (an sft adapter may start a reward model)
        merged = PeftModel.from_pretrained(model, str(path), config=config).merge_and_unload()
    except Exception as e:
        raise UserError(f"{key}: the LoRA adapter in {path} does not load onto its base model: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    return merged.requires_grad_(True)


# ---------------------------------------------------------------- adapters on a stage's model


class TrainableTensors:
    """What a LoRA checkpoint holds: the tensors that train (the adapters; a reward model's score
    head), under their names in the model. The frozen base is not saved: a resumed run reloads it
    from the same model path (the saved config pins it), so the weights continue exactly.

    Duck-types the state_dict / load_state_dict pair that checkpoint.save_checkpoint and
    load_checkpoint call on a model.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self._trainable().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self._trainable()
        if set(state) != set(params):
            raise UserError(f"the checkpoint holds {len(state)} adapter tensors that do not match this run's "
                            f"{len(params)} (another LoRA layout); use a new output_dir=...")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name])


class AdaptersOff:
    """The RL reference of a LoRA policy: the policy's own modules run with every adapter off.

    Called like a model (so response_logprobs computes pi_ref exactly as it computes pi), it holds
    no weights of its own: pi_ref is the base the adapters start from. LoRA's B starts at zero,
    so before the first update the policy equals the reference bit for bit and the KL is 0.
    """

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()  # the policy module itself, adapters injected

    def __call__(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.model(*args, **kwargs)


class Adapters:
    """peft LoRA injected into a loaded model in place: `model` (the stage's module) now computes
    W x + B A x * alpha / r, and only A, B (and modules_to_save) require gradients."""

    def __init__(self, peft_model, lora_cfg, base_path: str):
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()
        self.cfg = lora_cfg
        self.base_path = base_path
        self.state = TrainableTensors(self.model)  # the checkpoint's tensors

    def adapters_off(self) -> AdaptersOff:
        return AdaptersOff(self.peft_model)

    def final_model(self):
        """The module final/ saves: the merged plain HF model (merges in place: call it once, at the end),
        or peft's adapter (adapter_config.json + adapter_model.safetensors, base = base_path)."""
        if self.cfg.save == "merged":
            return self.peft_model.merge_and_unload()
        return self.peft_model

    def counts(self) -> dict[str, int]:
        from peft.tuners.lora import LoraLayer

        params = list(self.model.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params),
                "adapted_modules": sum(isinstance(m, LoraLayer) for m in self.model.modules())}

    def manifest(self) -> dict:
        counts = self.counts()
        return {"lora": {"r": self.cfg.r, "alpha": self.cfg.alpha, "target_modules": list(self.cfg.target_modules),
                         "adapted_modules": counts.pop("adapted_modules"), "save": self.cfg.save,
                         "base_model": self.base_path}, "parameters": counts}

    def describe(self) -> str:
        c = self.counts()
        return (f"LoRA r={self.cfg.r} alpha={self.cfg.alpha:g} on {c['adapted_modules']} modules: {c['trainable']:,} of "
                f"{c['total']:,} parameters train ({c['trainable'] / max(1, c['total']):.1%}); final/ {self.cfg.save}")


def manifest_entry(adapters: Adapters | None) -> dict:
    return adapters.manifest() if adapters is not None else {}


def attach(model, lora_cfg, task_type: str, model_path: str, run_root, rt) -> Adapters | None:
    """Inject LoRA adapters into `model` in place (None when lora.r = 0; nothing changes then).

    task_type: CAUSAL_LM (sft, rl policy) or SEQ_CLS (reward model: peft also trains a copy of
    the score head, saved with the adapter). The training mode of `model` is kept. The adapter's
    base is `model_path`; when that is itself an adapter (a LoRA final/, merged on loading) and
    final/ will be an adapter, the merged parent is written to <run>/base to be its base.
    Collective under torchrun (rank 0 writes that dir).
    """
    if lora_cfg.r == 0:
        return None
    from peft import LoraConfig, get_peft_model

    names = list(lora_cfg.target_modules)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    module_names = [n for n, _ in model.named_modules()]
    missing = [t for t in names if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:  # peft ignores a typo as long as one other name matches
        raise UserError(f"lora.target_modules: this model has no module named {', '.join(missing)}; its linear "
                        f"modules: {', '.join(linear)} (or lora.target_modules=[all-linear])")
    base = model_path
    if is_adapter_dir(model_path) and lora_cfg.save == "adapter":
        base = str(Path(run_root) / "base")
        if rt.is_main:  # the parent with its adapter merged (before ours goes in): the frozen part of this model
            _write_model_dir(model, Path(base))
        rt.barrier()
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())  # final/ loads from any working directory
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, task_type=task_type,
                        target_modules="all-linear" if names == ["all-linear"] else names)
    was_training = model.training
    try:
        with warnings.catch_warnings():  # peft asks transformers 5 about gradient checkpointing by a deprecated name
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. a target peft cannot adapt (a norm layer)
        raise UserError(f"lora.target_modules={names}: {(str(e).splitlines() or [type(e).__name__])[0][:160]} "
                        f"(linear modules of this model: {', '.join(linear)})") from None
    model.train(was_training)  # the new adapter modules would start in train mode (dropout) otherwise
    peft_model.peft_config["default"].base_model_name_or_path = base
    return Adapters(peft_model, lora_cfg, base)


def _write_model_dir(model, directory: Path) -> None:
    """Save a plain HF model dir once (temp name, then rename): the base of an adapter over a merged parent."""
    if (directory / "config.json").exists():
        return
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(directory, ignore_errors=True)  # no config.json: an incomplete leftover
    os.replace(tmp, directory)


# ---------------------------------------------------------------- what a stage holds in memory


def parameters_held(models: dict) -> dict[str, int]:
    """Parameter elements the stage's models hold in memory, each storage counted once.

    models: name -> module, AdaptersOff or None. -> {name: elements it adds beyond the models
    before it, "total": all of them, "trainable": those that require gradients}. The LoRA
    reference shares the policy's storage, so it adds 0; a frozen copy adds the whole policy.
    """
    seen, held, trainable = set(), {}, 0
    for name, obj in models.items():
        if obj is None:
            continue
        module = obj.model if isinstance(obj, AdaptersOff) else obj
        added = 0
        for p in module.parameters():
            key = (p.data_ptr(), p.numel())
            if p.numel() == 0 or key in seen:
                continue
            seen.add(key)
            added += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        held[name] = added
    return {**held, "total": sum(held.values()), "trainable": trainable}
