"""The groups every stage shares: model, data, optimizer, checkpoints, device, evaluation, logging, LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from rlhf_cli.config.fields import check_choice, check_positive, doc
from rlhf_cli.errors import ConfigError


@dataclass
class ModelConfig:
    path: Optional[str] = doc(None, "Hugging Face model dir or hub name; null = the embedded tiny model")
    dtype: str = doc("fp32", "weights dtype: fp32, bf16 or fp16 (fp16 trains with loss scaling, CUDA only)")
    trust_remote_code: bool = doc(False, "allow code shipped with the model to run (off: safe loading)")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward to save memory")
    max_length: int = doc(160, "max tokens of prompt + response; longer rows are truncated and counted")

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))
        check_positive("model.max_length", self.max_length)


@dataclass
class DataConfig:
    train: Any = doc(None, "local .json/.jsonl/.parquet/.csv file or a datasets hub name, or a list of them "
                           "read one after another ([pairs.jsonl,round1.jsonl]); null = embedded task")
    eval: Optional[str] = doc(None, "held-out rows, same formats; null = embedded task's held-out split")
    train_split: str = doc("train", "split of data.train when it is a hub name")
    eval_split: str = doc("test", "split of data.eval when it is a hub name")
    subset: Optional[str] = doc(None, "dataset config name (subset) for hub datasets")
    num_train: int = doc(4000, "embedded task: number of training rows")
    num_eval: int = doc(200, "embedded task: number of held-out rows")
    eval_limit: int = doc(200, "at most this many held-out rows are used per evaluation")

    def __post_init__(self):
        if isinstance(self.train, (list, tuple)):
            if not self.train or not all(isinstance(t, str) and t for t in self.train):
                raise ConfigError(f"data.train={list(self.train)!r}: a list must hold file paths or dataset names, "
                                  f"e.g. data.train=[pairs.jsonl,round1.jsonl]")
            self.train = list(self.train)
        elif self.train is not None and not isinstance(self.train, str):
            raise ConfigError(f"data.train={self.train!r} is not a path or dataset name; e.g. data.train=pairs.jsonl "
                              f"or data.train=[pairs.jsonl,round1.jsonl]")
        check_positive("data.num_train", self.num_train)
        check_positive("data.num_eval", self.num_eval)
        check_positive("data.eval_limit", self.eval_limit)


@dataclass
class OptimConfig:
    lr: Optional[float] = doc(None, "peak learning rate of AdamW; null = by what the stage starts from: a model "
                                    "built from a config (the embedded default) or a pretrained checkpoint "
                                    "(docs/models.md, defaults for pretrained models)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: List[float] = doc([0.9, 0.95], "AdamW betas")
    warmup_steps: int = doc(20, "linear warmup steps, then cosine decay")
    min_lr_ratio: float = doc(0.1, "cosine decays to lr * min_lr_ratio")
    max_grad_norm: Optional[float] = doc(1.0, "clip the global grad norm to this (null = no clipping)")
    grad_accum: int = doc(1, "micro-batches accumulated per optimizer step")
    max_bad_steps: int = doc(5, "stop after this many updates in a row with a NaN/inf loss or gradient, or a grad-norm "
                                "spike (each is skipped)")
    max_grad_spike: Optional[float] = doc(100.0, "skip an update whose pre-clip grad norm is over this x the running "
                                                 "median of recent ones (floored at max_grad_norm; null = off)")
    max_weight_growth: Optional[float] = doc(1.5, "stop when one update grows the trained weights' norm past this x "
                                                  "(healthy: under 1.02x; an absurd lr shows at once; null = off)")

    def __post_init__(self):
        check_positive("optim.lr", self.lr)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("optim.max_grad_norm", self.max_grad_norm)
        check_positive("optim.grad_accum", self.grad_accum)
        check_positive("optim.max_bad_steps", self.max_bad_steps)
        for key, value in (("optim.max_grad_spike", self.max_grad_spike), ("optim.max_weight_growth", self.max_weight_growth)):
            if value is not None and not value > 1:
                raise ConfigError(f"{key} must be > 1 (got {value}): it is a factor over normal; e.g. {key}=100, or null for off")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (got {list(self.betas)}); e.g. optim.betas=[0.9,0.95]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")


@dataclass
class CheckpointConfig:
    every: int = doc(100, "write a resumable checkpoint every N optimizer steps (and at the end)")
    keep_last: int = doc(2, "keep this many newest complete checkpoints")

    def __post_init__(self):
        check_positive("checkpoint.every", self.every)
        check_positive("checkpoint.keep_last", self.keep_last)


@dataclass
class DeviceConfig:
    type: str = doc("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    autocast: Optional[str] = doc(None, "mixed precision autocast: none or bf16 (null: bf16 for rl on a pretrained "
                                        "model where the device has bf16 matmul units, CUDA or a CPU with "
                                        "AVX512-BF16/AMX; else none)")
    distributed: str = doc("ddp", "under torchrun: ddp (replicate) or fsdp (shard)")
    threads: Optional[int] = doc(None, "CPU threads for torch (null = torch's default)")

    def __post_init__(self):
        if not (self.type in ("auto", "cpu", "cuda") or self.type.startswith("cuda:")):
            raise ConfigError(f"device.type={self.type!r} is not auto, cpu, cuda or cuda:N; e.g. device=cpu")
        if self.autocast is not None:
            check_choice("device.autocast", self.autocast, ("none", "bf16"))
        check_choice("device.distributed", self.distributed, ("ddp", "fsdp"))


@dataclass
class EvalConfig:
    every: int = doc(100, "evaluate on held-out data every N steps (and at the start and end)")
    max_new_tokens: int = doc(100, "generation length for held-out accuracy")
    batch_size: int = doc(100, "prompts per generation batch in evaluation")
    show_samples: int = doc(3, "sample generations printed at the end")
    rule: Optional[str] = doc("rlhf_cli.task:correctness_reward",
                              "held-out accuracy rule 'module:function' f(prompt, response, **row) -> 0/1; null = none")
    samples: int = doc(0, "K sampled responses per held-out prompt for pass@1, pass@k and maj@k beside greedy "
                          "accuracy (0 = greedy only)")
    pass_k: Optional[List[int]] = doc(None, "the k of pass@k and maj@k, each <= eval.samples (null = eval.samples alone)")
    temperature: float = doc(1.0, "sampling temperature of the eval.samples responses")

    def __post_init__(self):
        check_positive("eval.every", self.every)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.batch_size", self.batch_size)
        check_eval_sampling(self)


@dataclass
class EnvConfig:
    name: Optional[str] = doc(None, "a multi-turn environment class by dotted path 'module:Class' (reset(row) -> "
                                    "messages, step(text) -> Step): rollouts become episodes (docs/environments.md)")
    max_turns: Optional[int] = doc(None, "assistant turns per episode at most (null = the class's max_turns, else 4)")
    timeout_s: float = doc(10.0, "a reset or step call running longer ends its episode (logged as env_errors)")

    def __post_init__(self):
        if self.name is not None and (":" not in self.name or not all(self.name.partition(":")[::2])):
            raise ConfigError(f"env.name={self.name!r} is not 'module:Class'; e.g. "
                              f"env.name=rlhf_cli.envs.calculator:Calculator")
        if self.max_turns is not None:
            check_positive("env.max_turns", self.max_turns)
        check_positive("env.timeout_s", self.timeout_s)

    def turns(self, cls) -> int:
        """env.max_turns, or the class's own max_turns, or 4."""
        return self.max_turns or int(getattr(cls, "max_turns", 0) or 4)


def check_eval_sampling(eval_cfg) -> None:
    """eval.samples / eval.pass_k / eval.temperature (the stages' eval group and `rlhf eval`'s); resolves
    pass_k=null to [eval.samples]."""
    check_positive("eval.samples", eval_cfg.samples, allow_zero=True)
    check_positive("eval.temperature", eval_cfg.temperature)
    if eval_cfg.samples and eval_cfg.pass_k is None:
        eval_cfg.pass_k = [eval_cfg.samples]
    bad = [k for k in eval_cfg.pass_k or [] if not 1 <= k <= eval_cfg.samples]
    if bad:
        raise ConfigError(f"eval.pass_k={list(eval_cfg.pass_k)} needs every k in [1, eval.samples={eval_cfg.samples}] "
                          f"(pass@k and maj@k look at k of the K samples); e.g. eval.samples=8 eval.pass_k=[1,4,8]")


@dataclass
class LoggingConfig:
    tensorboard: bool = doc(False, "also write TensorBoard event files to <output_dir>/tensorboard (with the resolved config)")
    wandb: bool = doc(False, "also log to Weights & Biases (pip install wandb; WANDB_MODE=offline logs locally)")
    wandb_project: str = doc("rlhf", "W&B project; the run is named after output_dir")

    def __post_init__(self):
        import importlib.util

        for key, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
            if getattr(self, key) and importlib.util.find_spec(package) is None:
                raise ConfigError(f"logging.{key}=true but {package} is not installed; "
                                  f"pip install {package}, or set logging.{key}=false")


@dataclass
class LoRAConfig:
    """Low-rank adapters through peft (rlhf_cli/models/lora.py); r=0 trains every weight."""
    r: int = doc(0, "LoRA rank: 0 = off (full fine-tuning); e.g. lora.r=8 trains adapters only, the base stays frozen")
    alpha: float = doc(16.0, "LoRA alpha: the update B A x is scaled by alpha / r")
    dropout: float = doc(0.0, "dropout on the adapters' input (training mode only; rl runs in eval mode)")
    target_modules: List[str] = doc(["all-linear"], "modules that get adapters: [all-linear] (every linear layer but "
                                                    "the output head) or module names, e.g. [q_proj,v_proj]")
    save: str = doc("merged", "final/ holds: merged (a plain HF model dir) or adapter (adapter_config.json + "
                              "adapter_model.safetensors over the base model dir; loads with peft)")

    def __post_init__(self):
        check_positive("lora.r", self.r, allow_zero=True)
        check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        check_choice("lora.save", self.save, ("merged", "adapter"))
        names = list(self.target_modules)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"lora.target_modules must name modules (got {names}); e.g. lora.target_modules=[all-linear]")
        if "all-linear" in names and len(names) > 1:
            raise ConfigError(f"lora.target_modules: all-linear stands alone (got {names}); "
                              f"write lora.target_modules=[all-linear] or list module names")

    def check_with(self, device_cfg) -> None:
        """Cross-field: peft's adapters are not combined with FSDP2 sharding here (DDP replicates them)."""
        if self.r > 0 and device_cfg.distributed == "fsdp":
            raise ConfigError("lora.r > 0 is not supported with device.distributed=fsdp; use device.distributed=ddp "
                              "(adapters and their optimizer state are small, so replicating them costs little)")
