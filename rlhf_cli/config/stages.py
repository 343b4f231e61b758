"""The stages' schemas: sft, train-rm, dpo and rl (with rl's own groups), and their cross-field checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from rlhf_cli.config import origin
from rlhf_cli.config.fields import check_choice, check_engine_name, check_int_ranges, check_positive, check_room, doc
from rlhf_cli.config.groups import (CheckpointConfig, DataConfig, DeviceConfig, EnvConfig, EvalConfig, LoggingConfig,
                                    LoRAConfig, ModelConfig, OptimConfig)
from rlhf_cli.errors import ConfigError


class StageConfig:
    """What every stage's schema answers beside its keys, so that `rlhf validate` and the loop ask the stage
    instead of testing its name: the kind of its data rows, the model that trains, what one step takes, and
    how many of its rows a model of its max length can use (the stage's own tokenisation, without weights)."""

    data_kind = ""  # data.stage_rows' kind: sft, pairs, prompts
    model_key = "model"  # the config group of the model that trains

    @property
    def trained_model(self):
        return getattr(self, self.model_key)

    def check_common(self, stage: str, **extra_ranges) -> None:
        """The checks every stage's keys share (int ranges, the positive counts it has, `extra_ranges`: key ->
        allow_zero), then the defaults derived from its model and LoRA's device check.

        `derived` records, as "key=value", every key the config left null and the run resolved (by the model's
        origin here; rl adds those it resolves by reward source and rollout mode): each stage logs them and
        writes them into its final/ manifest as `derived_defaults`, so a reader can tell them from keys set."""
        check_int_ranges(self)
        for key in ("max_steps", "epochs", "batch_size", "log_every", "micro_batch_tokens"):
            if hasattr(self, key):
                check_positive(key, getattr(self, key))
        for key, allow_zero in extra_ranges.items():
            check_positive(key, getattr(self, key), allow_zero=allow_zero)
        self.derived = origin.resolve(stage, self, self.trained_model.path)
        self.lora.check_with(self.device)

    def step_takes(self, world_size: int, n_train: int) -> tuple[int, str, str, str]:
        """-> (the rows one optimizer step takes, what a row is, the keys that make that number, the fix when
        there are only n_train)."""
        per_device = self.optim.grad_accum * world_size
        fit = n_train // per_device
        return (self.batch_size * per_device, "rows",
                f"batch_size={self.batch_size} x optim.grad_accum={self.optim.grad_accum} x {world_size} rank(s)",
                f"set batch_size={fit} or less" if fit else "lower optim.grad_accum (or use fewer ranks)")

    def usable_rows(self, tokenizer, rows: list[dict], key: str, stop_ids) -> tuple[int, str]:
        """-> (the rows of `rows` the stage trains on, a note on the rest); stop_ids() -> the model's stop ids."""
        raise NotImplementedError


@dataclass
class SFTConfig(StageConfig):
    output_dir: str = doc("runs/sft", "run directory: config, metrics, checkpoints, final/ (reruns resume)")
    seed: int = doc(0, "seed of every random generator")
    max_steps: Optional[int] = doc(None, "optimizer steps; null with epochs null = by what the model is: 1500 built "
                                         "from a config, 1 epoch pretrained (docs/models.md)")
    epochs: Optional[float] = doc(None, "epochs over data.train when max_steps is null")
    batch_size: int = doc(64, "sequences per optimizer step per device (x optim.grad_accum); forwards run in "
                              "micro-batches of micro_batch_tokens")
    packing: bool = doc(False, "true: pack rows with a block-diagonal mask; false: length-bucketed padded batches")
    micro_batch_tokens: Optional[int] = doc(None, "padded tokens per forward+backward micro-batch (rows sorted by length, "
                                                  "gradients accumulated: the update is unchanged); null = derived from "
                                                  "the device's free memory and the model's size (logged; docs/memory.md)")
    log_every: int = doc(10, "log metrics every N steps")
    model: ModelConfig = doc(ModelConfig, "the model to fine-tune")
    data: DataConfig = doc(DataConfig, "training and held-out data (prompt/completion or messages rows)")
    optim: OptimConfig = doc(OptimConfig, "optimizer and schedule")
    eval: EvalConfig = doc(EvalConfig, "held-out evaluation")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "resumable checkpoints")
    logging: LoggingConfig = doc(LoggingConfig, "where metrics go: metrics.jsonl always, TensorBoard / W&B by choice")
    device: DeviceConfig = doc(DeviceConfig, "device placement")
    lora: LoRAConfig = doc(LoRAConfig, "LoRA adapters (lora.r > 0) instead of full fine-tuning")

    def __post_init__(self):
        self.check_common("sft")
        check_room("eval.max_new_tokens", self.eval.max_new_tokens, "model.max_length", self.model.max_length)

    data_kind = "sft"

    def usable_rows(self, tokenizer, rows: list[dict], key: str, stop_ids) -> tuple[int, str]:
        from rlhf_cli import data  # here, not at the top: `rlhf --help` and config docs need no tokenizer

        limit = self.model.max_length
        examples, cut = data.tokenize_sft(tokenizer, rows, limit, key, stop_ids())
        return len(examples), f"{cut} truncated to model.max_length={limit}"


@dataclass
class TrainRMConfig(StageConfig):
    output_dir: str = doc("runs/rm", "run directory: config, metrics, checkpoints, final/ (reruns resume)")
    seed: int = doc(0, "seed of every random generator")
    max_steps: Optional[int] = doc(None, "optimizer steps; null with epochs null = by what the model is: 2000 built "
                                         "from a config, 1 epoch pretrained (docs/models.md)")
    epochs: Optional[float] = doc(None, "epochs over data.train when max_steps is null")
    batch_size: int = doc(32, "preference pairs per optimizer step per device (x optim.grad_accum); forwards run "
                              "in micro-batches of micro_batch_tokens")
    micro_batch_tokens: Optional[int] = doc(None, "padded tokens per forward+backward micro-batch (rows sorted by length, "
                                                  "gradients accumulated: the update is unchanged); null = derived from "
                                                  "the device's free memory and the model's size (logged; docs/memory.md)")
    margin_from_data: bool = doc(True, "use a `margin` column when the data has one")
    center_coef: float = doc(0.01, "reward-centering coefficient: + c * mean((r_c + r_r)^2)")
    log_every: int = doc(10, "log metrics every N steps")
    model: ModelConfig = doc(ModelConfig, "the causal LM (or sequence classifier) to turn into a reward model")
    data: DataConfig = doc(DataConfig, "prompt/chosen/rejected rows")
    optim: OptimConfig = doc(OptimConfig, "optimizer and schedule")
    eval: EvalConfig = doc(EvalConfig, "held-out evaluation")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "resumable checkpoints")
    logging: LoggingConfig = doc(LoggingConfig, "where metrics go: metrics.jsonl always, TensorBoard / W&B by choice")
    device: DeviceConfig = doc(DeviceConfig, "device placement")
    lora: LoRAConfig = doc(LoRAConfig, "LoRA adapters (lora.r > 0) on the backbone; the score head trains in full")

    def __post_init__(self):
        self.check_common("train-rm", center_coef=True)
        if self.eval.samples:
            raise ConfigError("eval.samples samples a policy's responses (sft, rl, rlhf eval); a reward model "
                              "generates none: drop eval.samples")

    data_kind = "pairs"

    def usable_rows(self, tokenizer, rows: list[dict], key: str, stop_ids) -> tuple[int, str]:
        from rlhf_cli.models.scoring import tokenize_pairs

        limit = self.model.max_length
        pairs, dropped = tokenize_pairs(tokenizer, rows, limit, key, self.margin_from_data)
        return len(pairs), f"{dropped} dropped as longer than model.max_length={limit}"


# beta by loss when it is left null: TRL's DPOTrainer default (0.1) for the losses on implicit rewards; SimPO's
# paper range (2.0-2.5; TRL's CPOTrainer example) for its length-normalised log-probs, a scale 10-100x smaller
BETA_BY_LOSS = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}


@dataclass
class DPOConfig(StageConfig):
    output_dir: str = doc("runs/dpo", "run directory: config, metrics, checkpoints, reference log-probs, final/ "
                                      "(reruns resume)")
    seed: int = doc(0, "seed of every random generator")
    max_steps: Optional[int] = doc(None, "optimizer steps; null = epochs over data.train")
    epochs: float = doc(1.0, "epochs over data.train when max_steps is null (one: each round of iterated DPO "
                             "brings a few hundred pairs, and 300 steps on them fell 96% -> 82% in three rounds)")
    batch_size: int = doc(32, "preference pairs per optimizer step per device (x optim.grad_accum); forwards run "
                              "in micro-batches of micro_batch_tokens")
    micro_batch_tokens: Optional[int] = doc(None, "padded tokens per forward+backward micro-batch (a pair's two rows "
                                                  "together, gradients accumulated: the update is unchanged); null = "
                                                  "derived from the device's free memory and the model's size")
    loss: str = doc("sigmoid", "the preference loss by name: sigmoid (DPO; with label_smoothing, conservative DPO), "
                               "ipo, simpo (reference-free) (rlhf_cli/algorithms/preference.py)")
    beta: Optional[float] = doc(None, "the loss's inverse temperature (KL strength); null = by loss: 0.1 for "
                                      "sigmoid and ipo, 2.0 for simpo")
    label_smoothing: float = doc(0.0, "sigmoid / simpo: the share of pairs assumed mislabelled (cDPO); 0 = plain")
    gamma: float = doc(0.5, "simpo: the target reward margin")
    sft_weight: Optional[float] = doc(None, "weight of the chosen responses' per-token NLL added to the loss (RPO; "
                                            "0 = off); null = by what the model is: 1.0 built from a config, "
                                            "1.0 pretrained (docs/dpo.md)")
    log_every: int = doc(10, "log metrics every N steps")
    model: ModelConfig = doc(ModelConfig, "the policy to train; its starting weights are the reference")
    data: DataConfig = doc(DataConfig, "prompt/chosen/rejected rows (train-rm's formats)")
    optim: OptimConfig = doc(OptimConfig, "optimizer and schedule")
    eval: EvalConfig = doc(EvalConfig, "held-out evaluation: the pairs' ranking, and eval.rule on their prompts")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "resumable checkpoints")
    logging: LoggingConfig = doc(LoggingConfig, "where metrics go: metrics.jsonl always, TensorBoard / W&B by choice")
    device: DeviceConfig = doc(DeviceConfig, "device placement")
    lora: LoRAConfig = doc(LoRAConfig, "LoRA adapters (lora.r > 0) instead of full fine-tuning")

    def __post_init__(self):
        from rlhf_cli import algorithms  # here, not at the top: `rlhf --help` and config docs need no torch

        check_choice("loss", self.loss, algorithms.PREFERENCE_LOSSES)
        self.check_common("dpo", sft_weight=True, gamma=True)
        check_positive("beta", self.beta)
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 0.5): the share of pairs taken "
                              f"as mislabelled; e.g. label_smoothing=0.1")
        if self.beta is None:
            self.beta = BETA_BY_LOSS[self.loss]
            self.derived.append(f"beta={self.beta:g}")
        check_room("eval.max_new_tokens", self.eval.max_new_tokens, "model.max_length", self.model.max_length)

    data_kind = "pairs"

    @property
    def reference_free(self) -> bool:
        from rlhf_cli import algorithms

        return algorithms.PREFERENCE_LOSSES.trait(self.loss, "reference_free")

    def step_takes(self, world_size: int, n_train: int) -> tuple[int, str, str, str]:
        per_step, _, keys, fix = super().step_takes(world_size, n_train)
        return per_step, "pairs", keys, fix

    def usable_rows(self, tokenizer, rows: list[dict], key: str, stop_ids) -> tuple[int, str]:
        from rlhf_cli import data

        limit = self.model.max_length
        pairs, dropped = data.tokenize_preference(tokenizer, rows, limit, key, stop_ids())
        return len(pairs), f"{dropped} dropped as longer than model.max_length={limit}"


@dataclass
class PolicyConfig(ModelConfig):
    """The policy: like `model`, plus how its log-probs are computed."""

    chunked_logprobs: bool = doc(True, "log-probs and entropies from the hidden states in chunks of ~64 MiB of "
                                       "logits (exact; memory no longer grows with batch x tokens x vocabulary); "
                                       "false = the full (B, T, V) logits")


@dataclass
class ReferenceConfig:
    path: Optional[str] = doc(None, "frozen reference model; null = the policy's initial weights")
    dtype: Optional[str] = doc(None, "reference weights dtype (inference only): fp32, bf16 or fp16; null = bf16 "
                                     "on CUDA, the policy's weights dtype elsewhere")

    def __post_init__(self):
        if self.dtype is not None:
            check_choice("reference.dtype", self.dtype, ("fp32", "bf16", "fp16"))


@dataclass
class CriticConfig:
    init: str = doc("reward", "critic backbone initialised from: reward (the reward model), policy, or shared (a "
                              "value head on the policy itself: one forward and backward for both)")
    path: Optional[str] = doc(None, "explicit critic init path (overrides init)")
    lr: Optional[float] = doc(None, "critic learning rate (null = optim.lr)")

    def __post_init__(self):
        check_choice("critic.init", self.init, ("reward", "policy", "shared"))
        if self.init == "shared" and self.path:
            raise ConfigError("critic.path is unused with critic.init=shared (the value head sits on the policy); "
                              "drop one of them")


@dataclass
class RewardModelConfig:
    path: Optional[str] = doc(None, "reward model dir (a train-rm final/); null = no reward model")
    weight: float = doc(1.0, "weight of the reward-model score in the total reward")
    normalize: bool = doc(True, "standardise scores with the mean/std stored in the RM's manifest")
    dtype: Optional[str] = doc(None, "reward model weights dtype (inference only): fp32, bf16 or fp16; null = "
                                     "bf16 on CUDA, fp32 elsewhere")

    def __post_init__(self):
        if self.dtype is not None:
            check_choice("reward.model.dtype", self.dtype, ("fp32", "bf16", "fp16"))


@dataclass
class RewardConfig:
    model: RewardModelConfig = doc(RewardModelConfig, "the reward model source")
    functions: List[str] = doc([], "rule rewards by dotted path 'module:function', each f(prompt, response, **row)")
    function_weight: float = doc(1.0, "weight of each rule reward in the total reward")
    no_stop_penalty: float = doc(0.0, "added to the score of a response that never emits the stop token")
    overlong_buffer: int = doc(0, "DAPO's soft overlong penalty: over the last N tokens before rollout.max_new_tokens "
                                  "the score falls linearly from 0 to -reward.overlong_penalty (0 = off)")
    overlong_penalty: float = doc(1.0, "the overlong penalty at the length limit (with reward.overlong_buffer > 0)")

    def __post_init__(self):
        check_positive("reward.overlong_buffer", self.overlong_buffer, allow_zero=True)
        check_positive("reward.overlong_penalty", self.overlong_penalty, allow_zero=True)
        for name in self.functions:
            if ":" not in name:
                raise ConfigError(f"reward.functions entry {name!r} is not 'module:function'; e.g. reward.functions=[mypkg.rewards:exact]")


@dataclass
class AlgorithmConfig:
    name: str = doc("reinforce", "reinforce, a2c or ppo")
    advantage: str = doc("reinforce", "advantage estimator: reinforce (return-to-go - baseline), gae or nstep")
    baseline: str = doc("rloo", "REINFORCE baseline: none, mean, rloo, rloo_position (the others' return-to-go from "
                                "the same position: for process rewards), group_norm (GRPO, population std), "
                                "group_norm_unbiased (GRPO with the K-1 std: verl, TRL) or group_mean (Dr. GRPO: no std)")
    gamma: float = doc(1.0, "discount")
    lam: float = doc(0.95, "GAE lambda")
    nstep: int = doc(8, "n of n-step TD")
    whiten_advantages: bool = doc(False, "whiten advantages over the batch's real tokens")
    epochs: Optional[int] = doc(1, "passes over each rollout batch (PPO: K epochs); null = by staleness: 2, or 1 "
                                   "when rollout.mode=async with rollout.max_lag > 0 (docs/async.md)")
    minibatches: int = doc(1, "minibatches per pass (PPO: M)")
    clip_low: float = doc(0.2, "PPO ratio clip below 1")
    clip_high: float = doc(0.2, "PPO ratio clip above 1 (asymmetric clip allowed)")
    value_clip: Optional[float] = doc(0.2, "PPO value clip range (null = unclipped)")
    value_coef: float = doc(0.5, "weight of the value loss")
    entropy_coef: float = doc(0.0, "weight of the entropy bonus")
    target_kl: Optional[float] = doc(None, "PPO: stop the epochs early when approx KL passes this")
    clip_ratio_c: Optional[float] = doc(None, "PPO dual clip (Ye et al. 2020): cap the loss of tokens with a negative "
                                              "advantage at -A * c, c > 1 (e.g. 3.0); null = off")
    dynamic_sampling: Optional[bool] = doc(None, "DAPO dynamic sampling: drop prompts whose K samples got equal "
                                                 "rewards and draw more prompts until the step's batch is full "
                                                 "(algorithm.max_draws at most); null = by reward source: on for rule "
                                                 "rewards alone (sync mode), off when a reward model scores "
                                                 "(its gain there was within noise, for 2-3x the RM forwards; "
                                                 "measured on the task suite, docs/suite.md)")
    max_draws: int = doc(4, "dynamic sampling: rollout draws per step at most; a batch still short is filled with "
                            "equal-reward groups (logged as sampling_topped_up_groups)")
    loss_agg: str = doc("token-mean", "how per-token loss terms become one number: token-mean, seq-mean-token-mean "
                                      "(GRPO), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO: token sums / "
                                      "rollout.max_new_tokens); docs/algorithms.md")

    def __post_init__(self):
        from rlhf_cli import algorithms  # here, not at the top: `rlhf --help` and config docs need no torch

        check_choice("algorithm.name", self.name, algorithms.POLICY_LOSSES)
        check_choice("algorithm.advantage", self.advantage, algorithms.ADVANTAGE_ESTIMATORS)
        check_choice("algorithm.baseline", self.baseline, algorithms.BASELINES)
        check_choice("algorithm.loss_agg", self.loss_agg, algorithms.LOSS_AGGREGATIONS)
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ConfigError(f"algorithm.clip_ratio_c={self.clip_ratio_c} must be > 1 (the dual clip caps the loss at "
                              f"-A * c, above PPO's own clip); e.g. algorithm.clip_ratio_c=3.0, or null for off")
        check_positive("algorithm.epochs", self.epochs)
        check_positive("algorithm.minibatches", self.minibatches)
        check_positive("algorithm.max_draws", self.max_draws)
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("algorithm.gamma and algorithm.lam must be in [0, 1]")

    @property
    def needs_critic(self) -> bool:
        """The advantage estimator bootstraps from a critic's values (its registry trait)."""
        from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS  # torch: see __post_init__

        return ADVANTAGE_ESTIMATORS.trait(self.advantage, "needs_values")


# rollout.ENGINES' names, here so that a config check imports no model code (tests/test_imports.py keeps them equal)
ENGINE_NAMES = ("auto", "lean", "hf", "vllm")

# algorithm.epochs=null (PPO's default) resolves by staleness (docs/async.md, measured on six seeds): a batch
# generated one update old is already off-policy by that update, and a second pass moves it further
PPO_EPOCHS = 2
PPO_EPOCHS_LAGGED = 1

# kl.coef=null resolves by reward source (docs/suite.md): against a learned reward model the penalty is
# what keeps the policy inside the region the RM was trained on (Gao et al. 2022, reward over-optimisation)
KL_COEF_RULES_ONLY = 0.05  # TRL's default; 0 (DAPO's choice for verifiable rewards) lost accuracy on the suite
KL_COEF_WITH_RM = 0.2


@dataclass
class KLConfig:
    coef: Optional[float] = doc(None, "initial KL coefficient beta; null = by reward source: 0.05 for rule rewards "
                                      "alone, 0.2 when a reward model contributes (it is a learned proxy the policy "
                                      "can exploit; measured on the task suite, docs/suite.md)")
    estimator: str = doc("k1", "k1: penalty in the reward; in the loss: k3 (low variance), k2 (0.5 log-ratio^2: "
                               "the unbiased KL gradient) or k3_clamped (verl's low_var_kl); docs/algorithms.md")
    target: Optional[float] = doc(None, "adaptive beta toward this KL per sequence (null = fixed beta)")
    horizon: int = doc(10000, "adaptive KL horizon (Ziegler et al. 2019)")

    def __post_init__(self):
        check_positive("kl.coef", self.coef, allow_zero=True)
        from rlhf_cli.algorithms import KL_ESTIMATORS  # torch: see AlgorithmConfig.__post_init__

        check_choice("kl.estimator", self.estimator, KL_ESTIMATORS)
        check_positive("kl.target", self.target)


@dataclass
class VLLMConfig:
    gpu_memory_utilization: float = doc(0.2, "fraction of the GPU (on CPU: of the machine's memory) vLLM takes for "
                                             "its weights and KV cache beside the training process")
    sleep: bool = doc(False, "CUDA: vLLM's sleep mode after each generate call, its weights in host memory and its "
                             "KV cache released while the policy trains (more room for training, two copies a step)")


@dataclass
class RolloutConfig:
    prompts_per_step: int = doc(16, "prompts sampled per RL step (global, all ranks)")
    samples_per_prompt: int = doc(8, "K responses per prompt (groups for rloo / group_norm)")
    max_new_tokens: int = doc(100, "response length limit")
    temperature: float = doc(1.0, "sampling temperature; log-probs everywhere use logits / T")
    top_k: Optional[int] = doc(None, "top-k sampling (biases the KL estimate; logged)")
    top_p: Optional[float] = doc(None, "nucleus sampling (biases the KL estimate; logged)")
    engine: str = doc("auto", "decoding engine: lean (Llama-family models, preallocated KV cache), hf (the model's "
                              "own forward), auto (lean where it applies), vllm (vLLM in this process with a copy of "
                              "the weights, pushed before each rollout: make install-vllm; docs/engines.md), or an engine class of "
                              "yours by dotted path 'module:Class' (docs/engines.md)")
    vllm: VLLMConfig = doc(VLLMConfig, "rollout.engine=vllm: vLLM's share of the device")
    is_cap: Optional[float] = doc(2.0, "rollout.engine=vllm: each token's policy-gradient term weighted by min(pi_train / "
                                       "pi_vllm, is_cap), truncated importance sampling for the engines' "
                                       "mismatch (Yao et al. 2025); null = off (docs/engines.md)")

    def __post_init__(self):
        check_engine_name("rollout.engine", self.engine, ENGINE_NAMES)
        if self.engine == "vllm":
            from rlhf_cli.engines.vllm_engine import check_installed  # finds vLLM without importing it

            check_installed("rollout.engine")
        if self.is_cap is not None and self.is_cap < 1:
            raise ConfigError(f"rollout.is_cap={self.is_cap} is below 1: it would down-weight tokens the engines "
                              f"agree on; set rollout.is_cap >= 1 (2 is TRL's), or null to turn the correction off")
        if not 0 < self.vllm.gpu_memory_utilization <= 1:
            raise ConfigError(f"rollout.vllm.gpu_memory_utilization={self.vllm.gpu_memory_utilization} is not in "
                              f"(0, 1]; set a fraction such as 0.2")
        check_positive("rollout.prompts_per_step", self.prompts_per_step)
        check_positive("rollout.samples_per_prompt", self.samples_per_prompt)
        check_positive("rollout.max_new_tokens", self.max_new_tokens)
        check_positive("rollout.temperature", self.temperature)
        self.check_async()

    # rollout.mode=async: actor ranks generate and score, learner ranks train (rlhf_cli/rl/actors.py, docs/async.md)
    mode: str = doc("sync", "sync: every rank generates, scores and trains in turn; async (under torchrun): "
                            "rollout.actors ranks generate and score while the others train (A3C / IMPALA layout)")
    actors: int = doc(1, "async: ranks that generate and score (the last ones); the rest learn")
    sync_every: int = doc(1, "async: the learners send their weights to the actors every N updates")
    max_lag: int = doc(1, "async: a batch is generated with weights at most N updates older than the update that "
                          "uses it (actors wait for newer weights); 0 = the synchronous algorithm's updates")
    rho_max: float = doc(1.0, "async: truncation of the importance weights pi / mu of the off-policy correction "
                              "(IMPALA's rho-bar; the V-trace traces use min(1, rho_max))")

    @property
    def lagged(self) -> bool:
        """Batches may come from weights older than the ones they update (async with a lag budget)."""
        return self.mode == "async" and self.max_lag > 0

    def check_async(self) -> None:
        check_choice("rollout.mode", self.mode, ("sync", "async"))
        check_positive("rollout.actors", self.actors)
        check_positive("rollout.sync_every", self.sync_every)
        check_positive("rollout.max_lag", self.max_lag, allow_zero=True)
        check_positive("rollout.rho_max", self.rho_max)
        if self.max_lag < self.sync_every - 1:  # weights of version v exist on the actors only for v a multiple of N
            raise ConfigError(f"rollout.max_lag={self.max_lag} with rollout.sync_every={self.sync_every}: the actors "
                              f"would wait for weights the learners never send; set rollout.max_lag to at least "
                              f"{self.sync_every - 1} (rollout.sync_every - 1) or lower rollout.sync_every")


@dataclass
class PlacementConfig:
    policy: Optional[str] = doc(None, "device of the policy (null = device.type)")
    reference: Optional[str] = doc(None, "device of the reference model (null = the policy's)")
    reward: Optional[str] = doc(None, "device of the reward model (null = the policy's)")
    critic: Optional[str] = doc(None, "device of the critic (null = the policy's)")


@dataclass
class RLConfig(StageConfig):
    output_dir: str = doc("runs/rl", "run directory: config, metrics, checkpoints, final/ (reruns resume)")
    seed: int = doc(0, "seed of every random generator (offset by rank)")
    max_steps: int = doc(150, "RL iterations (rollout + update)")
    micro_batch_tokens: Optional[int] = doc(None, "padded tokens per forward+backward micro-batch (rows sorted by length, "
                                                  "gradients accumulated: the update is unchanged); null = derived from "
                                                  "the device's free memory and the model's size (logged; docs/memory.md)")
    log_every: int = doc(1, "log metrics every N iterations")
    policy: PolicyConfig = doc(PolicyConfig, "the policy to train (an SFT final/)")
    reference: ReferenceConfig = doc(ReferenceConfig, "the frozen reference for the KL penalty")
    critic: CriticConfig = doc(CriticConfig, "value model for a2c / ppo")
    reward: RewardConfig = doc(RewardConfig, "reward sources")
    algorithm: AlgorithmConfig = doc(AlgorithmConfig, "reinforce, a2c or ppo")
    kl: KLConfig = doc(KLConfig, "KL penalty to the reference")
    rollout: RolloutConfig = doc(RolloutConfig, "sampling")
    data: DataConfig = doc(DataConfig, "prompt rows (other columns are passed to reward functions)")
    optim: OptimConfig = doc(OptimConfig, "optimizer and schedule")
    eval: EvalConfig = doc(EvalConfig, "held-out evaluation")
    checkpoint: CheckpointConfig = doc(CheckpointConfig, "resumable checkpoints")
    logging: LoggingConfig = doc(LoggingConfig, "where metrics go: metrics.jsonl always, TensorBoard / W&B by choice")
    device: DeviceConfig = doc(DeviceConfig, "device placement")
    placement: PlacementConfig = doc(PlacementConfig, "per-model devices")
    lora: LoRAConfig = doc(LoRAConfig, "LoRA adapters on the policy (lora.r > 0): the reference is then the policy "
                                       "with its adapters off, no second copy; the critic trains in full")
    env: EnvConfig = doc(EnvConfig, "multi-turn episodes against an environment (env.name=module:Class)")

    def __post_init__(self):
        self.check_common("rl")
        for key, new_tokens in (("rollout.max_new_tokens", self.rollout.max_new_tokens),
                                ("eval.max_new_tokens", self.eval.max_new_tokens)):
            check_room(key, new_tokens, "policy.max_length", self.policy.max_length)
        if self.lora.r > 0 and not self.reference.path and self.placement.reference not in (None, self.placement.policy):
            raise ConfigError("placement.reference cannot differ from the policy's with lora.r > 0: the reference is the "
                              "policy with its adapters off; drop placement.reference (or set reference.path=...)")
        if not self.reward.functions and not self.reward.model.path and not self.env.name:
            raise ConfigError("no reward source: set reward.model.path=<train-rm final/> and/or reward.functions=[module:function] "
                              "(or env.name=module:Class: an environment's turn rewards)")
        # resolved here, so config.yaml and the log show the value in force, and recorded as derived
        algo = self.algorithm
        for holder, key, value in ((self.kl, "coef", KL_COEF_WITH_RM if self.reward.model.path else KL_COEF_RULES_ONLY),
                                   (algo, "dynamic_sampling", self.dynamic_sampling_default),
                                   (algo, "epochs", PPO_EPOCHS_LAGGED if self.rollout.lagged else PPO_EPOCHS)):
            if getattr(holder, key) is None:
                setattr(holder, key, value)
                self.derived.append(f"{'kl' if holder is self.kl else 'algorithm'}.{key}={value}")
        from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, BASELINES, POLICY_LOSSES, reads  # torch: see __post_init__

        if POLICY_LOSSES.trait(algo.name, "needs_critic") and not algo.needs_critic:
            raise ConfigError(f"algorithm {algo.name} needs a critic: set algorithm.advantage=gae or nstep")
        if (reads(ADVANTAGE_ESTIMATORS.get(algo.advantage), "baseline") and BASELINES.trait(algo.baseline, "compares_group")
                and self.rollout.samples_per_prompt < 2):
            raise ConfigError(f"algorithm.baseline={algo.baseline} needs rollout.samples_per_prompt >= 2 (got {self.rollout.samples_per_prompt})")
        if algo.dynamic_sampling and self.rollout.samples_per_prompt < 2:
            raise ConfigError(f"algorithm.dynamic_sampling=true compares the K samples of a prompt and needs "
                              f"rollout.samples_per_prompt >= 2 (got {self.rollout.samples_per_prompt})")
        if self.reward.overlong_buffer > self.rollout.max_new_tokens:
            raise ConfigError(f"reward.overlong_buffer={self.reward.overlong_buffer} is longer than the response limit "
                              f"rollout.max_new_tokens={self.rollout.max_new_tokens}; set it to at most that "
                              f"(DAPO: 4096 of 20480)")
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if batch % algo.minibatches:
            raise ConfigError(f"algorithm.minibatches={algo.minibatches} does not divide the rollout batch of {batch} "
                              f"(rollout.prompts_per_step x rollout.samples_per_prompt); choose a divisor")
        if algo.needs_critic and self.critic.init == "shared" and self.device.distributed == "fsdp":
            raise ConfigError("critic.init=shared is not supported with device.distributed=fsdp; use ddp or "
                              "critic.init=policy")
        if algo.needs_critic and self.critic.init == "shared" and self.placement.critic not in (None, self.placement.policy):
            raise ConfigError("placement.critic cannot differ from the policy's with critic.init=shared (the value "
                              "head sits on the policy); drop placement.critic")
        if self.rollout.engine == "lean" and self.device.distributed == "fsdp":
            raise ConfigError("rollout.engine=lean cannot decode an FSDP-sharded policy; use rollout.engine=auto (the "
                              "model's own forward under FSDP) or device.distributed=ddp")
        if not POLICY_LOSSES.trait(algo.name, "trust_region") and algo.epochs != 1:
            raise ConfigError(f"{algo.name} makes one pass per rollout batch: set algorithm.epochs=1 (or algorithm=ppo)")
        unsupported = {"algorithm.dynamic_sampling=true": algo.dynamic_sampling,
                       "device.distributed=fsdp": self.device.distributed == "fsdp",
                       "rollout.engine=vllm": self.rollout.engine == "vllm",  # actors generate with the local engine
                       "env.name (multi-turn episodes)": bool(self.env.name)}
        for key in (k for k, chosen in unsupported.items() if chosen and self.rollout.mode == "async"):
            raise ConfigError(f"rollout.mode=async does not support {key} yet (the learners train with ddp on the "
                              f"batches the actors send); drop it or use rollout.mode=sync")

    @property
    def dynamic_sampling_default(self) -> bool:
        """algorithm.dynamic_sampling=null: on for rule rewards alone; off with a reward model, with or without a
        rule (identical short answers do tie under an RM, but redrawing them gained +0.9 to +1.7 points a cell on
        the suite's tuning tasks, within one seed's noise, for 2-3x the RM forwards: docs/suite.md), in async mode
        (not supported there yet) and with one sample per prompt (no group to compare)."""
        return not self.reward.model.path and self.rollout.mode == "sync" and self.rollout.samples_per_prompt >= 2

    data_kind = "prompts"
    model_key = "policy"

    def step_takes(self, world_size: int, n_train: int) -> tuple[int, str, str, str]:
        per_step = self.rollout.prompts_per_step  # the global draw: the ranks split it
        return (per_step, "prompts", f"rollout.prompts_per_step={per_step}",
                f"set rollout.prompts_per_step={n_train} or less (rollout.samples_per_prompt sets the samples per "
                f"prompt)")

    def usable_rows(self, tokenizer, rows: list[dict], key: str, stop_ids) -> tuple[int, str]:
        from rlhf_cli import data

        limit = self.policy.max_length
        room = limit - self.rollout.max_new_tokens  # as the stage cuts them: prompt + response fit
        long = sum(len(data.encode_prompt(tokenizer, data.prompt_text(tokenizer, row, i, key))) > room
                   for i, row in enumerate(rows))
        return len(rows), (f"{long} prompts longer than {room} tokens (policy.max_length={limit} - "
                           f"rollout.max_new_tokens; cut from the left)")


STAGE_SCHEMAS = {"sft": SFTConfig, "train-rm": TrainRMConfig, "dpo": DPOConfig, "rl": RLConfig}
