"""Where a stage's starting weights come from: built from a config (the embedded default, the task suite) or
pretrained (every user's model), and the defaults each takes (docs/models.md, "Defaults for pretrained models").

A model built from a config by this tool carries `rlhf_built_from_config: true` in its config.json
(embedded.write_embedded_base writes it); transformers keeps unknown config keys through from_pretrained and
save_pretrained, so every final/ of that lineage carries it too. Anything else, a model whose weights were
loaded, is pretrained. Reads JSON (and /proc/cpuinfo; torch's CUDA query off CPU) only: config checks call it
before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

MARK = "rlhf_built_from_config"
SCRATCH, PRETRAINED = "built from a config", "pretrained"

def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bf16 matmul units (the avx512_bf16 or amx_bf16 flag; unknown: no)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))


def bf16_where_fast(cfg) -> str:
    """rl's device.autocast for a pretrained model: bf16 where the policy's device has bf16 matmul units (CUDA
    with bf16; a CPU with AVX512-BF16 or AMX), else none. Measured on SmolLM2-135M-Instruct on a CPU with
    AVX512-BF16: an RL step 1.5-1.6x faster, held-out accuracy within 3 points of fp32's on two tasks
    (docs/models.md, "rl's bf16 autocast")."""
    spec = cfg.placement.policy or cfg.device.type  # auto, cpu, cuda or cuda:N
    if spec != "cpu":
        import torch  # not for a CPU run: config checks stay light

        if spec.startswith("cuda") or torch.cuda.is_available():  # cuda, or auto with a GPU
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "none"
    return "bf16" if cpu_has_bf16() else "none"


# The defaults that differ by origin, per stage: (key, from scratch, pretrained). From scratch: chosen on the
# task suite (docs/suite.md). Pretrained: chosen on SmolLM2-135M-Instruct (docs/models.md), from TRL's anchors
# (SFT 2e-5, reward model 1e-5, GRPO 1e-6; rl: 1e-5 measured against 2e-6, docs/suite-pretrained.md): the
# from-scratch rates wreck a pretrained model in one update.
# A default may be a function of the config (the device's bf16 units); "none" goes unlogged.
BY_ORIGIN = {
    "sft": {"optim.lr": (6e-3, 2e-5), "max_steps": (1500, None), "epochs": (1.0, 1.0),
            "device.autocast": ("none", "none")},
    "train-rm": {"optim.lr": (1e-3, 1e-5), "max_steps": (2000, None), "epochs": (1.0, 1.0),
                 "device.autocast": ("none", "none")},
    "dpo": {"optim.lr": (3e-4, 1e-5), "sft_weight": (1.0, 1.0), "device.autocast": ("none", "none")},
    "rl": {"optim.lr": (3e-4, 1e-5), "device.autocast": ("none", bf16_where_fast)},
}


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def weights_origin(path: str | None) -> str:
    """SCRATCH for the embedded default (path None) and for models carrying MARK (a LoRA adapter dir: its
    base's config), else PRETRAINED (a hub name too: its weights are loaded)."""
    if not path:
        return SCRATCH
    p = Path(str(path)).expanduser()
    config = read_json(p / "config.json")
    if not config and (p / "adapter_config.json").exists():
        base = read_json(p / "adapter_config.json").get("base_model_name_or_path")
        return weights_origin(base) if base else PRETRAINED
    return SCRATCH if config.get(MARK) else PRETRAINED


def resolve(stage: str, cfg, model_path: str | None) -> list[str]:
    """Set every by-origin key the config leaves null to the value for `model_path`'s origin; -> "key=value"
    of each key set (the stage logs them as derived defaults)."""
    scratch = weights_origin(model_path) == SCRATCH
    said = []
    table = BY_ORIGIN[stage]
    run_by_steps = "max_steps" not in table or cfg.max_steps is not None or cfg.epochs is not None
    for key, (from_scratch, pretrained) in table.items():
        if key in ("max_steps", "epochs") and run_by_steps:
            continue  # the user chose steps (or epochs): the other key is not read
        holder, _, name = key.rpartition(".")
        target = cfg if not holder else getattr(cfg, holder)
        if getattr(target, name) is None:
            value = from_scratch if scratch else pretrained
            value = value(cfg) if callable(value) else value
            setattr(target, name, value)
            if value is not None and value != "none":
                said.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return said


def describe(stage: str, cfg, model_path: str | None) -> str | None:
    """The log line of the by-origin defaults this run took (None when it took none)."""
    said = [d for d in getattr(cfg, "derived", ()) if d.partition("=")[0] in BY_ORIGIN[stage]]
    if not said:
        return None
    what = weights_origin(model_path)
    why = ("the model carries rlhf_built_from_config" if what == SCRATCH and model_path else
           "the embedded model" if what == SCRATCH else "its weights were loaded, not built from a config")
    model = "a model built from a config" if what == SCRATCH else "a pretrained model"
    return f"{stage}: {', '.join(said)}: the defaults for {model} ({why}; set a key to override; docs/models.md)"
