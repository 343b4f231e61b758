"""The tools' settings (`rlhf eval`, `rlhf generate`, `rlhf label`): typed schemas with a doc on every key, as
the stages' (range checks in __post_init__), and the key=value parser they share: an unknown key names the
closest, a bad value names the key, before anything loads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import List, Optional

from rlhf_cli.config.fields import check_choice, check_engine_name, check_positive, doc, leaf_keys
from rlhf_cli.config.groups import EnvConfig, EvalConfig, check_eval_sampling
from rlhf_cli.config.stages import ENGINE_NAMES
from rlhf_cli.errors import ConfigError, UserError

DEFAULT_RULE = EvalConfig.rule  # the stages' rule; read here without importing torch (evaluation.DEFAULT_RULE)


def check_tool_engine(engine: str, key: str) -> None:
    """The tools' engine (generate's `engine`, eval's `rollout.engine`): one of the stages' rollout.engine
    choices, and vllm only where vLLM is installed."""
    check_engine_name(key, engine, ENGINE_NAMES)
    if engine == "vllm":
        from rlhf_cli.engines.vllm_engine import check_installed  # finds vLLM without importing it

        check_installed(key)


@dataclass
class ToolDeviceConfig:
    """`device` of the tools (eval, generate, label): the stages' key names."""
    type: str = doc("auto", "auto (cuda if present, else cpu), cpu, cuda or cuda:N; `device=cpu` sets it too")
    threads: Optional[int] = doc(None, "CPU threads for torch (null = torch's default)")


@dataclass
class EvalDataConfig:
    eval: Optional[str] = doc(None, "held-out rows: .jsonl/.json/.parquet/.csv, dataset dir or hub name; "
                                    "null = the embedded task's held-out prompts")
    eval_split: str = doc("test", "split of data.eval when it is a dataset dir or hub name")
    subset: Optional[str] = doc(None, "dataset config name (subset) of data.eval")
    num_eval: Optional[int] = doc(None, "embedded task: held-out rows (null = as the checkpoint's run, else 200)")
    eval_limit: Optional[int] = doc(None, "evaluate at most this many rows (null = as the checkpoint's run, else 200)")


@dataclass
class EvalRunConfig:
    rule: Optional[str] = doc(DEFAULT_RULE, "accuracy rule 'module:function' f(prompt, response, **row) -> 0/1; null = none")
    max_new_tokens: Optional[int] = doc(None, "response length limit (null = as the checkpoint's run, else 40)")
    batch_size: int = doc(100, "prompts per generation batch")
    show_samples: int = doc(3, "sample generations shown in the table")
    samples: int = doc(0, "K sampled responses per prompt for pass@1, pass@k (unbiased, Chen et al. 2021) and maj@k "
                          "beside greedy accuracy (0 = greedy only)")
    pass_k: Optional[List[int]] = doc(None, "the k of pass@k and maj@k, each <= eval.samples (null = eval.samples alone)")
    temperature: float = doc(1.0, "sampling temperature of the eval.samples responses")


@dataclass
class EvalModelConfig:
    dtype: str = doc("fp32", "weights dtype of the checkpoint and the reward model: fp32, bf16 or fp16")
    trust_remote_code: bool = doc(False, "allow code shipped with the model to run")


@dataclass
class EvalRolloutConfig:
    engine: str = doc("auto", "rollout engine: auto, lean, hf or vllm (rlhf eval CKPT rollout.engine=vllm)")


@dataclass
class EvalRewardModelConfig:
    path: Optional[str] = doc(None, "a train-rm final/ that scores the responses; null = no reward-model score")


@dataclass
class EvalRewardConfig:
    model: EvalRewardModelConfig = doc(EvalRewardModelConfig, "the reward model (as rl's reward.model)")


# the keys as the stages name them: `rlhf eval` once had its own names for these
RENAMED = {"reward_model": "reward.model.path", "dtype": "model.dtype", "trust_remote_code": "model.trust_remote_code"}


@dataclass
class EvalToolConfig:
    seed: Optional[int] = doc(None, "seed of the embedded task's held-out split (null = the checkpoint's run seed, else 0)")
    model: EvalModelConfig = doc(EvalModelConfig, "how the checkpoint loads")
    reward: EvalRewardConfig = doc(EvalRewardConfig, "reward-model score of the responses")
    device: ToolDeviceConfig = doc(ToolDeviceConfig, "device placement")
    data: EvalDataConfig = doc(EvalDataConfig, "the held-out prompts")
    eval: EvalRunConfig = doc(EvalRunConfig, "generation and the accuracy rule")
    rollout: EvalRolloutConfig = doc(EvalRolloutConfig, "the engine that generates (as rl's rollout)")
    micro_batch_tokens: Optional[int] = doc(None, "memory budget in padded tokens (as the stages' key): bounds "
                                                  "the rows of one decode call and of one reward-model forward; "
                                                  "null = derived from free memory and the model's size "
                                                  "(docs/memory.md)")
    env: EnvConfig = doc(EnvConfig, "held-out episodes against an environment (as rl's env; null = the "
                                    "checkpoint's run's env.name, if it had one)")

    def __post_init__(self):
        check_choice("model.dtype", self.model.dtype, ("fp32", "bf16", "fp16"))
        check_tool_engine(self.rollout.engine, "rollout.engine")
        check_positive("device.threads", self.device.threads)
        check_positive("micro_batch_tokens", self.micro_batch_tokens)
        for key, value in (("eval.batch_size", self.eval.batch_size), ("eval.max_new_tokens", self.eval.max_new_tokens),
                           ("data.num_eval", self.data.num_eval), ("data.eval_limit", self.data.eval_limit)):
            check_positive(key, value)
        check_positive("eval.show_samples", self.eval.show_samples, allow_zero=True)
        check_eval_sampling(self.eval)
        if self.eval.rule is not None and ":" not in self.eval.rule:
            raise ConfigError(f"eval.rule={self.eval.rule!r} is not 'module:function'; e.g. eval.rule={DEFAULT_RULE}")


def parse_settings(schema, args: list[str], tool: str, example: str):
    """A tool that takes key=value settings only (generate, label): anything else is one line naming an example."""
    positional = [a for a in args if "=" not in a]
    if positional:
        raise UserError(f"rlhf {tool} takes key=value settings only (got {positional[0]!r}); e.g. rlhf {tool} {example}")
    return parse_overrides(schema, args, tool)


def parse_overrides(schema, overrides: list[str], tool: str):
    """key=value strings -> the typed schema object; unknown keys suggest the closest, bad values name the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    keys = leaf_keys(schema)
    # `device=cpu` as in a stage, where it picks the device group
    overrides = [f"device.type={o.split('=', 1)[1]}" if o.startswith("device=") else o for o in overrides]
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in RENAMED and key not in keys:
            raise ConfigError(f"{key}= is named {RENAMED[key]}= (as in the stages); write {RENAMED[key]}=...")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
            raise ConfigError(f"unknown key {key!r} for rlhf {tool}" +
                              (f"; did you mean {close[0]}?" if close else f"; see `rlhf {tool} --help`"))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a value"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}; see `rlhf {tool} --help`") from None


@dataclass
class GenerateModelConfig:
    path: Optional[str] = doc(None, "the policy to sample: an sft or rl final/ (or any causal LM dir); required")
    dtype: str = doc("fp32", "weights dtype: fp32, bf16 or fp16")
    trust_remote_code: bool = doc(False, "allow code shipped with the model to run")


@dataclass
class GenerateDataConfig:
    prompts: Optional[str] = doc(None, "prompt rows (`prompt` text or messages, or `messages`): .jsonl/.json/"
                                       ".parquet/.csv, dataset dir or hub name; null = the embedded task")
    split: str = doc("train", "split of data.prompts when it is a dataset dir or hub name; embedded task: "
                              "train or eval (its held-out prompts)")
    subset: Optional[str] = doc(None, "dataset config name (subset) of data.prompts")
    num_prompts: int = doc(200, "embedded task: number of prompts")
    num_eval: int = doc(200, "embedded task: size of its held-out split (as the stages' data.num_eval)")
    limit: Optional[int] = doc(None, "use at most this many rows of data.prompts (null = all)")


@dataclass
class GenerateToolConfig:
    output: Optional[str] = doc(None, "the generations file (.jsonl) to write or continue; required")
    samples_per_prompt: int = doc(4, "K: responses per prompt")
    temperature: float = doc(1.0, "sampling temperature")
    max_new_tokens: int = doc(40, "response length limit in tokens")
    seed: int = doc(0, "seed of the keyed sampling noise (and of the embedded task's prompts)")
    batch_size: int = doc(16, "prompts per generate call (each with its K responses); rows are flushed per batch")
    engine: str = doc("auto", "rollout engine: auto, lean, hf or vllm (as rl's rollout.engine)")
    model: GenerateModelConfig = doc(GenerateModelConfig, "the policy")
    data: GenerateDataConfig = doc(GenerateDataConfig, "the prompts")
    device: ToolDeviceConfig = doc(ToolDeviceConfig, "device placement")
    micro_batch_tokens: Optional[int] = doc(None, "memory budget in padded tokens (as the stages' key): bounds "
                                                  "the rows of one decode call; null = derived from free memory "
                                                  "and the model's size (docs/memory.md)")
    env: EnvConfig = doc(EnvConfig, "sample multi-turn episodes against an environment (as rl's env)")

    def __post_init__(self):
        check_choice("model.dtype", self.model.dtype, ("fp32", "bf16", "fp16"))
        check_tool_engine(self.engine, "engine")
        check_positive("device.threads", self.device.threads)
        check_positive("micro_batch_tokens", self.micro_batch_tokens)
        for key in ("samples_per_prompt", "temperature", "max_new_tokens", "batch_size"):
            check_positive(key, getattr(self, key))
        for key in ("num_prompts", "num_eval", "limit"):
            check_positive(f"data.{key}", getattr(self.data, key))
        if self.model.path is None:
            raise ConfigError("model.path= is required: the policy to sample, e.g. model.path=runs/rl/final")
        if self.output is None:
            raise ConfigError("output= is required: the generations file, e.g. output=gens.jsonl")
        if self.data.prompts is None:
            check_choice("data.split", self.data.split, ("train", "eval"))


@dataclass
class LabelRewardModelConfig:
    path: Optional[str] = doc(None, "a train-rm final/: the judge (judge=rm) or the model mined (mine=disagree)")
    dtype: str = doc("fp32", "reward model weights dtype: fp32, bf16 or fp16")


@dataclass
class LabelRewardConfig:
    functions: List[str] = doc([], "judge=rule: rule rewards 'module:function', each f(prompt, response, **row); "
                                   "a response's score is their sum")
    model: LabelRewardModelConfig = doc(LabelRewardModelConfig, "the reward model")


@dataclass
class LabelToolConfig:
    input: Optional[str] = doc(None, "generations file from `rlhf generate` (prompt + responses per row); required")
    output: Optional[str] = doc(None, "preference pairs file (.jsonl) to write; judge=human appends to it; required")
    judge: str = doc("rule", "who prefers: rule (reward.functions), rm (reward.model.path) or human (a local page)")
    pairs: str = doc("best_worst", "pairs per prompt: best_worst (one) or all (every pair the judge orders); "
                                   "judge=human: best_worst shows responses 0 and 1, all every pair")
    margin: bool = doc(False, "write the judge's score gap as `margin` (rule and rm)")
    unfinished: str = doc("drop", "responses rlhf generate cut at max_new_tokens (`stopped` false): drop (left out "
                                  "of every pair, counted: dpo would teach the policy to stop where the cut was) or "
                                  "keep")
    mine: str = doc("none", "none, or disagree: keep only pairs reward.model.path does not rank the judge's way")
    batch_size: int = doc(64, "responses per reward-model forward")
    port: int = doc(8765, "judge=human: the page's port on 127.0.0.1")
    labeler: Optional[str] = doc(None, "judge=human: the labeler's name written with each choice (null = the "
                                       "login name); a page opened with ?labeler=NAME labels as NAME")
    reward: LabelRewardConfig = doc(LabelRewardConfig, "the judge's rule functions and reward model")
    device: ToolDeviceConfig = doc(ToolDeviceConfig, "device placement of reward models")

    def __post_init__(self):
        check_choice("judge", self.judge, ("rule", "rm", "human"))
        check_choice("pairs", self.pairs, ("best_worst", "all"))
        check_choice("unfinished", self.unfinished, ("drop", "keep"))
        check_choice("mine", self.mine, ("none", "disagree"))
        check_choice("reward.model.dtype", self.reward.model.dtype, ("fp32", "bf16", "fp16"))
        check_positive("batch_size", self.batch_size)
        check_positive("device.threads", self.device.threads)
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} is not a TCP port; set port=<1..65535>, e.g. port=8765")
        for key in ("input", "output"):
            if getattr(self, key) is None:
                raise ConfigError(f"{key}= is required, e.g. input=gens.jsonl output=prefs.jsonl")
        for name in self.reward.functions:
            if ":" not in name:
                raise ConfigError(f"reward.functions entry {name!r} is not 'module:function'; "
                                  f"e.g. reward.functions=[rlhf_cli.task:correctness_reward]")
        if self.judge == "rule" and not self.reward.functions:
            raise ConfigError("judge=rule needs reward.functions=[module:function,...], "
                              "e.g. reward.functions=[rlhf_cli.task:correctness_reward]")
        if self.judge == "rm" and not self.reward.model.path:
            raise ConfigError("judge=rm needs reward.model.path=<a train-rm final/>")
        if self.mine == "disagree":
            if self.judge == "human":
                raise ConfigError("mine=disagree is for judge=rule: people's choices are kept as they are made; "
                                  "drop mine=disagree (or judge the samples with judge=rule)")
            if self.judge == "rm":
                raise ConfigError("mine=disagree compares reward.model.path with the judge, and judge=rm is that "
                                  "same model; use judge=rule or judge=human to mine its blind spots")
            if not self.reward.model.path:
                raise ConfigError("mine=disagree needs reward.model.path=<the train-rm final/ whose mistakes to keep>")
