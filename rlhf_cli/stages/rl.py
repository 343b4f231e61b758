"""`rlhf rl`: REINFORCE, A2C and PPO against reward models and rule-based rewards.

    rlhf rl policy.path=runs/sft/final                                   # REINFORCE, rule reward
    rlhf rl algorithm=ppo policy.path=runs/sft/final reward=rm reward.model.path=runs/rm/final
    rlhf rl -m algorithm=reinforce,a2c,ppo seed=1,2,3                    # a sweep, a dir per job
    torchrun --nproc-per-node 2 -m rlhf_cli rl device=cpu                # DDP over 2 ranks, same code path

The algorithms share one recipe and differ in the advantage estimator and the
policy loss, looked up by their configured names (algorithm.advantage,
algorithm.name) in the registries of rlhf_cli/algorithms/ (docs/algorithms.md).
`RLRecipe.train` is the loop; each iteration is five calls: 1 rollout (a rollout
engine, rollout.py), 2 score (rewards, reference, old log-probs and values),
3 advantages, 4 update, 5 log and checkpoint. Every model runs in eval mode
(dropout off); only the policy (and critic) receive gradients.

Under torchrun the ranks split the step's prompts (rank r takes prompts
r*P/W..(r+1)*P/W-1 of the global draw), never the K samples of one prompt,
so rloo / group_norm groups are whole on every rank. Token t of global
rollout row g is drawn with noise keyed by (seed, step, g): ranks sample
differently, reruns and resumes sample the same, and W ranks x B rows draw
what one process with W*B rows draws. Everything computed across rows is
global: the running-mean baseline, advantage whitening, the loss (normalised
by the minibatch's token or response count over all ranks, by
algorithm.loss_agg), the KL controller, PPO's early stop and the logged
metrics. Dynamic sampling (algorithm.dynamic_sampling) fills each rank's share
of the batch from its own draws, every rank drawing until all are full.

With rollout.mode=async (actors.py, docs/async.md) the last rollout.actors ranks run steps 1 and 2 (the
rollout side the recipe builds in `setup_rollout_side`: rollout_side.py) and send each batch to a learner rank;
the learners run `train` with steps 1 and 2 replaced by receiving that batch and their own forward, and
correct the advantages for the actor's older weights (algorithms/offpolicy.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_cli import data
from rlhf_cli.algorithms import (ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, POLICY_LOSSES, AdaptiveKLController,
                                 FixedKLController, aggregate, bind, kl_k1, local_units, masked_mean, masked_sum,
                                 pack, pack_index, rank_share, token_rewards, unpack,
                                 truncated_importance_weights, truncated_is_weights, value_loss, vtrace)
from rlhf_cli.config import origin
from rlhf_cli.engines.rollout import Rollout, check_engine, concat_rollouts, make_engine, select_rows
from rlhf_cli.envs import env_class
from rlhf_cli.errors import ConfigError, UserError
from rlhf_cli.models import lora
from rlhf_cli.models import (check_generation_fits, check_models, check_same_tokenizer, dropout_off, frozen,
                             load_causal_lm, load_scalar_head_model, load_tokenizer, model_path, position_limit)
from rlhf_cli.models.logprobs import PolicyWithValueHead, Support, TokenValues, response_logprobs
from rlhf_cli.rewards.sources import ModelReward, rule_sources
from rlhf_cli.rl import actors
from rlhf_cli.rl.rollout_side import Micro, Rewarded, RolloutSide, micro_split
from rlhf_cli.training import checkpoint, distributed, loop, memory, optim
from rlhf_cli.training.evaluation import (episode_accuracy, held_out_accuracy, sampled_episode_accuracy,
                                          stage_sampled_metrics)
from rlhf_cli.training.precision import Precision, frozen_dtype
from rlhf_cli.training.tracking import Tracker


def bind_keys(fn, keys: dict, leading: int, what: str):
    """algorithms.bind, its refusal (a parameter that no key supplies) said as a config error: one line, exit 2."""
    try:
        return bind(fn, keys, leading, what)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tied_groups(scores: torch.Tensor, step_rewards: torch.Tensor, K: int) -> torch.Tensor:
    """(B,) scores + (B, T) process rewards of B = G x K rows -> (G,) bool: the group's K outcome totals are
    all equal (within 1e-6; a NaN total counts as tied), so a group baseline gives it no signal (dynamic
    sampling redraws it; logged as zero_signal_group_frac)."""
    outcome = (scores + step_rewards.sum(-1)).view(-1, K)
    return ~(outcome.max(1).values - outcome.min(1).values > 1e-6)


@dataclass
class Scored:
    """Step 2's output: one rollout batch of this rank, B rows x T response tokens, everything on the policy's device."""
    rollout: Rollout
    input_ids: torch.Tensor  # (B, P + T) prompt + response
    attention_mask: torch.Tensor  # (B, P + T)
    mask: torch.Tensor  # (B, T) response mask: 1 up to and including the stop token
    prompt_width: int  # P
    scores: torch.Tensor  # (B,) sequence scores: rules + reward model + no-stop penalty
    step_rewards: torch.Tensor  # (B, T) process rewards on the tokens ending each step
    score_stats: dict  # rule_reward / rm_score means of this rank's rows
    logprobs_ref: torch.Tensor  # (B, T) under the frozen reference
    logprobs_old: torch.Tensor  # (B, T) under the policy before the update (detached)
    values_old: torch.Tensor | None  # (B, T) critic values before the update, 0 on padding; None without a critic
    kl_per_token: torch.Tensor  # (B, T) k1 KL to the reference, 0 on padding (logged; the KL controller's input)
    update_forward: tuple | None  # single pass: the update's own (log-probs, entropies, values), with gradients
    is_weights: torch.Tensor | None = None  # (B, T) truncated importance weights pi_train / pi_engine (vllm)
    logprobs_behaviour: torch.Tensor | None = None  # (B, T) async: under the actor's weights that sampled them


class NoActors:
    """rollout.mode=sync: no actor ranks to send weights to or hear from (what actors.LearnerLink is in async)."""

    active = False

    def publish(self, policy, version: int) -> None:
        pass

    def close(self) -> None:
        pass


class RLRecipe:
    """setup (reward sources, data, models, optimizer, resume) -> train (five steps a loop) -> save final/."""

    def __init__(self, cfg, rt, run_dir, t_start: float, actors=None, learners: int | None = None):
        self.cfg, self.rt, self.run_dir, self.t_start = cfg, rt, run_dir, t_start
        # rollout.mode=async, on a learner rank: its link to the actor ranks (actors.LearnerLink); sync: none to tell
        self.actors = actors or NoActors()
        self.learners = learners or rt.world_size  # the ranks the step's prompts are split over
        a = cfg.algorithm
        self.running_mean = distributed.GlobalRunningMean(rt)  # the 'mean' baseline over every rank's rows
        # each registered loss / estimator reads the keys its signature names, bound here once (a name that is
        # no key is refused): the algorithm's keys, the length limit (Dr. GRPO's normaliser), K, the running mean
        keys = dataclasses.asdict(a) | {"max_new_tokens": cfg.rollout.max_new_tokens,
                                        "group_size": cfg.rollout.samples_per_prompt, "running_mean": self.running_mean}
        self.policy_loss = bind_keys(POLICY_LOSSES.get(a.name), keys, 4, "algorithm.name")
        self.trust_region = POLICY_LOSSES.trait(a.name, "trust_region")  # clipped value loss, first-minibatch checks
        self.estimate_advantages = bind_keys(ADVANTAGE_ESTIMATORS.get(a.advantage), keys, 4, "algorithm.advantage")
        self.vtrace = ADVANTAGE_ESTIMATORS.trait(a.advantage, "vtrace")  # on lagged rollouts V-trace stands in
        self.aggregate = bind_keys(aggregate, keys, 2, "algorithm.loss_agg")  # the entropy and KL terms, as the loss
        self.kl_estimator = KL_ESTIMATORS.get(cfg.kl.estimator)
        self.kl_in_reward = KL_ESTIMATORS.trait(cfg.kl.estimator, "in_reward")  # else: a term of the loss
        self.single_pass = a.epochs == 1 and a.minibatches == 1  # the update's forward gives the old log-probs
        self.chunk = None if cfg.policy.chunked_logprobs else 0  # log-prob chunking (logprobs.response_terms)

    # ================================================================ setup
    def setup(self) -> None:
        """The table of contents: each line assigns what one step of the setup returns."""
        self.side = self.setup_rollout_side()
        self.critic, self.shared = self._critic()
        # before the optimizer: FSDP2 shards in place (DDP wraps); rollouts use the unwrapped modules
        self.ddp_policy, self.ddp_critic, self.reference, self.reward_model = self._wrap_models()
        self.side.reference = self.reference  # FSDP2: the sharded ones
        if self.rm_source is not None:
            self.rm_source.model = self.reward_model
        self.parts = self._checkpoint_parts()
        self.held = lora.parameters_held({"policy": self.policy, "reference": self.reference,
                                          "reward_model": self.reward_model, "critic": self.critic})
        self.optimizer, self.scheduler, self.guard = self._optimizer()
        self.kl_ctl = (AdaptiveKLController(self.cfg.kl.coef, self.cfg.kl.target, self.cfg.kl.horizon)
                       if self.cfg.kl.target else FixedKLController(self.cfg.kl.coef))
        self.step = loop.resume(self.run_dir, self.rt, self.parts, self.optimizer, self.scheduler, self.precision,
                                sampler=self.sampler, kl=self.kl_ctl, running_mean=self.running_mean, guard=self.guard)
        self._announce()

    def setup_rollout_side(self) -> RolloutSide:
        """What steps 1 and 2 need (an async actor rank stops here: `actor_side`): reward sources, data, policy,
        reference, reward model -> the rollout side that both call (rollout_side.py)."""
        cfg, rt = self.cfg, self.rt
        check_models("rl", cfg)  # every model path a model dir of the kind its key needs, before any weights load
        rules = rule_sources(cfg.reward.functions, cfg.reward.function_weight)  # cheap to fail: before any weights
        self.env_cls = env_class(cfg.env.name) if cfg.env.name else None  # multi-turn episodes (engines/episodes.py)
        self.policy_path = model_path(cfg.policy, self.run_dir.root, cfg.seed, rt)
        check_generation_fits(self.policy_path, {"rollout.max_new_tokens": cfg.rollout.max_new_tokens,  # before
                                                 "eval.max_new_tokens": cfg.eval.max_new_tokens})  # any weights
        check_engine(cfg.rollout.engine, self.policy_path, "policy.path")  # vllm: an architecture it runs
        # prompt + response fit in policy.max_length and in the model's positions
        self.max_sequence = min(cfg.policy.max_length, position_limit(self.policy_path) or cfg.policy.max_length)
        self.dev_policy, self.dev_ref, self.dev_reward, self.dev_critic = (
            rt.placement[k] for k in ("policy", "reference", "reward", "critic"))
        self.precision = Precision(cfg.policy.dtype, cfg.device.autocast, self.dev_policy)
        self.prompts_per_rank, self.K, self.rows_per_rank = self._batch_shape()
        self.tokenizer = load_tokenizer(self.policy_path, "policy.path", cfg.policy.trust_remote_code)
        self.train_rows, self.eval_rows, self.train_prompts, self.eval_prompts, self.train_prompt_ids = self._data()
        self.memory = self._memory_plan()  # before any weights load
        self.policy, self.adapters, self.reference = self._policy_and_reference()
        self.engine, self.support = self._engine()
        self.rm_source = self._reward_model()
        self.reward_model = self.rm_source.model if self.rm_source else None
        self.reward_sources = rules + ([self.rm_source] if self.rm_source else [])
        self.sampler = data.EpochSampler(len(self.train_rows), cfg.seed)  # the same global draw on every rank
        return RolloutSide(cfg, rt, self.learners, self.tokenizer, self.train_rows, self.train_prompts,
                           self.train_prompt_ids, self.policy, self.engine, self.precision, self.memory,
                           self.dev_policy, self.dev_ref, self.dev_reward, self.reference, self.reward_sources,
                           self.support, self.chunk, self.env_cls, self.max_sequence)

    def _batch_shape(self) -> tuple[int, int, int]:
        """Ranks split the prompts, never a prompt's K samples (whole rloo / group_norm groups on every rank)
        -> (prompts per rank, K, rows per rank)."""
        cfg, world = self.cfg, self.learners
        if world > cfg.rollout.prompts_per_step or cfg.rollout.prompts_per_step % world:
            raise UserError(f"rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a multiple of the "
                            f"world size {world} (each rank samples whole groups)")
        prompts_per_rank, K = cfg.rollout.prompts_per_step // world, cfg.rollout.samples_per_prompt
        if prompts_per_rank * K % cfg.algorithm.minibatches:
            raise UserError(f"algorithm.minibatches={cfg.algorithm.minibatches} does not divide the "
                            f"{prompts_per_rank * K} rollout rows of each of the {world} ranks "
                            f"(rollout.prompts_per_step / world size x rollout.samples_per_prompt); choose a divisor")
        return prompts_per_rank, K, prompts_per_rank * K

    def _data(self) -> tuple[list[dict], list[dict], list[str], list[str], list[list[int]]]:
        """-> (train rows, eval rows, their prompt texts, the train prompts' ids cut from the left to leave
        room for the response)."""
        cfg, tokenizer = self.cfg, self.tokenizer
        train_rows, eval_rows = data.stage_rows(cfg.data, cfg.data_kind, cfg.seed)
        loop.check_batch_fits(cfg, self.rt.world_size, len(train_rows))
        # a `prompt` column (text or messages) or a `messages` conversation without its last assistant turn; with
        # an environment: its opening messages for the row (envs.openings: a reset that fails is one error line)
        train_prompts, eval_prompts = (data.prompt_texts(tokenizer, rows, key, self.env_cls, cfg.env.timeout_s)
                                       for rows, key in ((train_rows, "data.train"), (eval_rows, "data.eval")))
        room = self.max_sequence - cfg.rollout.max_new_tokens  # a prompt's tokens: cut from the left beyond it
        train_prompt_ids = [data.cut_left(data.encode_prompt(tokenizer, p), room, tokenizer) for p in train_prompts]
        return train_rows, eval_rows, train_prompts, eval_prompts, train_prompt_ids

    def _memory_plan(self) -> memory.MemoryPlan:
        """micro_batch_tokens, or a budget from the device's free memory and what this rank holds: the policy
        (and a separate critic) trained, the reference and the reward model frozen (memory.py)."""
        cfg = self.cfg
        longest = (max(len(ids) for ids in self.train_prompt_ids) + cfg.rollout.max_new_tokens
                   if self.env_cls is None else self.max_sequence)  # an episode: up to the sequence limit
        trained = [(self.policy_path, True)]
        if cfg.algorithm.needs_critic and cfg.critic.init != "shared":
            trained.append((self._critic_path(), False))
        frozen_models = []
        if not (cfg.lora.r > 0 and not cfg.reference.path) and not self.actors.active:
            frozen_models.append((cfg.reference.path or self.policy_path,
                                  frozen_dtype(cfg.reference.dtype, self.dev_ref, self.precision.weights)))
        if cfg.reward.model.path:
            frozen_models.append((cfg.reward.model.path, frozen_dtype(cfg.reward.model.dtype, self.dev_reward, "fp32")))
        return memory.plan("micro_batch_tokens", cfg.micro_batch_tokens, self.dev_policy, trained, frozen_models,
                           longest, cfg.policy.dtype, cfg.policy.gradient_checkpointing, cfg.lora.r > 0,
                           cfg.policy.trust_remote_code)

    def _critic_path(self) -> str:
        cfg = self.cfg
        return cfg.critic.path or (cfg.reward.model.path if cfg.critic.init == "reward" and cfg.reward.model.path
                                   else self.policy_path)

    def _policy_and_reference(self):
        """-> (the policy, its LoRA adapters or None, the frozen reference: the adapter-free policy under LoRA,
        None on an async learner)."""
        cfg, rt, path = self.cfg, self.rt, self.policy_path
        policy = load_causal_lm(path, "policy.path", self.precision.weights, self.dev_policy, cfg.policy.trust_remote_code)
        if cfg.policy.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        adapters = lora.attach(policy, cfg.lora, "CAUSAL_LM", path, self.run_dir.root, rt)  # lora.r > 0: adapters train
        dropout_off(policy)  # during RL (checklist 1); gradients still flow, gradient checkpointing still applies
        # the reference computes like the policy (same weights dtype and autocast): KL is exactly 0 at the start
        if adapters is not None and not cfg.reference.path:  # LoRA: the policy itself with its adapters off
            reference = adapters.adapters_off()
        elif self.actors.active:  # an async learner: the actors send the reference's log-probs
            reference = None
        else:
            reference = frozen(load_causal_lm(cfg.reference.path or path, "reference.path",
                                              frozen_dtype(cfg.reference.dtype, self.dev_ref, self.precision.weights),
                                              self.dev_ref, cfg.policy.trust_remote_code))
        if cfg.reference.path:
            check_same_tokenizer(self.tokenizer, load_tokenizer(cfg.reference.path, "reference.path"), "reference.path")
        return policy, adapters, reference

    def _engine(self):
        """-> (the rollout engine over the policy, the ids it can draw: log-probs are over them, so the
        update's pi is the one responses came from)."""
        cfg, rt = self.cfg, self.rt
        engine_options = ({**dataclasses.asdict(cfg.rollout.vllm), "max_model_len": self.max_sequence,
                           "seed": cfg.seed, "distributed": rt.distributed} if cfg.rollout.engine == "vllm" else None)
        engine = make_engine(cfg.rollout.engine, self.policy, self.tokenizer, engine_options,  # rollouts, evaluation
                             memory=self.memory)
        return engine, Support(engine.vocab_limit, tuple(engine.never or ()))

    def _reward_model(self) -> ModelReward | None:
        """-> the frozen reward model as a reward source (its score standardised by the mean and std of its
        manifest when reward.model.normalize), or None."""
        cfg = self.cfg
        if not cfg.reward.model.path:
            return None
        check_same_tokenizer(self.tokenizer, load_tokenizer(cfg.reward.model.path, "reward.model.path"),
                             "reward.model.path")
        # as a module whose forward scores (TokenValues): what FSDP2 shards and gathers as one root
        reward_model = frozen(TokenValues(load_scalar_head_model(
            cfg.reward.model.path, "reward.model.path", frozen_dtype(cfg.reward.model.dtype, self.dev_reward, "fp32"),
            self.dev_reward, pad_id=self.tokenizer.pad_token_id)))
        rm_manifest = checkpoint.read_manifest(cfg.reward.model.path)
        source = ModelReward(reward_model, self.tokenizer, self.dev_reward, cfg.reward.model.weight,
                             tokens=self.memory.infer_tokens)
        if cfg.reward.model.normalize and "score_std" in rm_manifest:
            source.mean, source.std = float(rm_manifest["score_mean"]), max(float(rm_manifest["score_std"]), 1e-6)
        return source

    def _critic(self):
        """-> (the value parameters, the policy with a value head on it or None): shared, one forward and
        backward for both; else a separate scalar-head model; (None, None) without a critic."""
        cfg = self.cfg
        if cfg.algorithm.needs_critic and cfg.critic.init == "shared":
            shared = PolicyWithValueHead(self.policy, self.chunk, self.support)
            return shared.v_head, shared
        if not cfg.algorithm.needs_critic:
            return None, None
        critic = TokenValues(load_scalar_head_model(self._critic_path(), "critic.path", self.precision.weights,
                                                    self.dev_critic, pad_id=self.tokenizer.pad_token_id))
        critic.eval()
        return critic, None

    def _wrap_models(self):
        """-> (the policy and a separate critic wrapped for DDP / sharded by FSDP2, the reference and reward
        model sharded under FSDP2: a LoRA reference, AdaptersOff, stays as it is)."""
        cfg, rt, critic = self.cfg, self.rt, self.critic
        return (distributed.wrap_model(self.shared or self.policy, rt, cfg.device.distributed),
                distributed.wrap_model(critic, rt, cfg.device.distributed)
                if critic is not None and self.shared is None else None,
                distributed.shard_frozen(self.reference, rt, cfg.device.distributed),
                distributed.shard_frozen(self.reward_model, rt, cfg.device.distributed))

    def _checkpoint_parts(self) -> dict:
        """What a checkpoint saves: name -> (module, key prefix); under LoRA the policy's adapters only."""
        parts = {"policy": (self.adapters.state if self.adapters else self.policy, "")}
        if self.critic is not None:
            parts["critic"] = (self.critic, "" if self.shared else "model.")
        return parts

    def _optimizer(self):
        """-> (AdamW over the policy's trainable parameters and the critic's at critic.lr, its schedule, the
        step guard)."""
        cfg = self.cfg
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad]}]  # LoRA: the adapters
        if self.critic is not None:
            groups.append({"params": list(self.critic.parameters()), "lr": cfg.critic.lr or cfg.optim.lr})
        return optim.build(groups, cfg.optim, cfg.max_steps)

    def _announce(self) -> None:
        cfg, rt, a, K, step = self.cfg, self.rt, self.cfg.algorithm, self.K, self.step
        self.tracker = Tracker(self.run_dir.root, "rl", cfg.max_steps, step, enabled=rt.is_main,
                               progress_keys=("score", "kl", "response_len", "samples_per_s"))
        say = self.tracker.message
        sources = [source.name for source in self.reward_sources] + (
            [f"environment {cfg.env.name} (turn rewards; {cfg.env.turns(self.env_cls)} turns at most)"]
            if self.env_cls is not None else [])
        say(f"rl: {a.name} ({a.advantage}{', baseline ' + a.baseline if a.advantage == 'reinforce' else ''}), "
            f"{cfg.rollout.prompts_per_step} prompts x {K} samples per step over {rt.world_size} rank(s), "
            f"rewards: {', '.join(sources)}" + (f"; resuming at step {step}" if step else ""))
        say(f"rl: global batch {cfg.rollout.prompts_per_step * K} = {self.rows_per_rank} ({self.prompts_per_rank} "
            f"prompts x {K} samples) x 1 accum x {rt.world_size} ranks, {a.minibatches} minibatch(es) x "
            f"{a.epochs} epoch(s) per rollout, policy on {self.dev_policy} ({self.precision.describe()}"
            + (f", {cfg.device.distributed}" if rt.distributed else "") + "); old log-probs: "
            + ("the update's own forward in one micro-batch, else " if self.single_pass else "")
            + ("the sampler's" if self.sampler_logprobs_apply() else "a no-grad forward"))
        held = self.held
        frozen_models = {"reference": self.reference, "reward model": self.reward_model}
        say("rl: frozen weights: " + ", ".join(
            f"{name} {str(next(m.parameters()).dtype).removeprefix('torch.')}"
            + (" (sharded)" if distributed.is_sharded(m) else "")
            for name, m in frozen_models.items() if isinstance(m, torch.nn.Module))
            or ("none (the actors hold the reference)" if self.actors.active else "none (LoRA reference)"))
        say(f"rl: {self.memory.describe()}")
        if origin.describe("rl", cfg, cfg.policy.path):
            say(origin.describe("rl", cfg, cfg.policy.path))
        say(f"rl: {held['total']:,} parameters in memory ({held['trainable']:,} train): "
            + ", ".join(f"{k} {v:,}" for k, v in held.items() if k not in ("total", "trainable"))
            + (f"; {self.adapters.describe()}" if self.adapters else "")
            + ("; reference = the policy with adapters off" if isinstance(self.reference, lora.AdaptersOff) else ""))
        derived = {d.partition("=")[0] for d in cfg.derived}
        if "kl.coef" in derived:
            say(f"rl: kl.coef {cfg.kl.coef} (derived: {'a reward model is in the reward' if self.reward_model is not None else 'rule rewards alone'}"
                f"; the default by reward source)")
        if a.dynamic_sampling:
            say(f"rl: algorithm.dynamic_sampling true: groups with K equal rewards are redrawn, up to "
                f"{a.max_draws} draws a step (sampling_draws)"
                + ("; derived: the default for rule rewards alone" if "algorithm.dynamic_sampling" in derived else ""))
        if "algorithm.epochs" in derived and cfg.rollout.lagged and a.name == "ppo":
            say(f"rl: algorithm.epochs {a.epochs} (derived: batches up to rollout.max_lag={cfg.rollout.max_lag} updates "
                f"old are off-policy already; the default with a lag)")
        if cfg.rollout.top_k or cfg.rollout.top_p:
            say("rl: top-k/top-p sampling biases the KL estimate (log-probs are of the unfiltered policy)")
        if self.actors.active:
            say(self.actors.describe())

    # ================================================================ train
    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps

    def train(self) -> dict:
        self.actors.publish(self.policy, self.step)  # async: the actors start from this step's weights
        before = loop.evaluate_before(self)
        last = loop.train_steps(self)  # train_step, then loop.end_of_step, to max_steps
        self.actors.close()
        return self.save(last, before)

    def train_step(self) -> dict:
        """One RL step, its five parts -> its metrics."""
        t0 = time.perf_counter()
        if not self.actors.active:
            rows, prompts, rollout, sampling, rewarded = self.rollout_batch()    # 1. rollout
            t1 = time.perf_counter()
            if rewarded is None:  # else dynamic sampling scored the kept groups already
                rewarded = self.side.reward_rows(rollout, prompts, rows)         # 2. score: rewards,
            logprobs_ref = self.side.logprobs_under(self.reference, self.dev_ref, rollout)  # the reference,
            scored = self.score(rollout, rewarded, logprobs_ref)                 # old log-probs and values
        else:  # rollout.mode=async: rolled out and scored on an actor rank, with weights <= max_lag old
            received, sampling = self.actors.receive(self.step, self.dev_policy)  # 1.+2. (actors.py)
            t1 = time.perf_counter()
            scored = self.score(received.rollout, received.rewarded, received.logprobs_ref,
                                received.logprobs_behaviour)                     # 2. the learner's forward
        t2 = time.perf_counter()
        rewards, advantages, returns, beta = self.advantages(scored)             # 3. advantages
        update_stats = self.update(scored, advantages, returns, beta)            # 4. update
        self.actors.publish(self.policy, self.step)                              # async: weights -> actors
        t3 = time.perf_counter()
        return self.step_metrics(scored, rewards, returns, beta,                # 5. metrics (then loop.end_of_step:
                                 update_stats | sampling, (t0, t1, t2, t3))      # log, eval, checkpoint)

    # ---------------------------------------------------------------- 1. rollout
    def rollout_batch(self) -> tuple[list[dict], list[str], Rollout, dict]:
        """The step's rollout; with algorithm.dynamic_sampling, DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2):
        groups whose K outcome totals are all equal (no signal for a group baseline) are dropped and further
        draws of prompts_per_step prompts fill the batch, up to algorithm.max_draws draws; a batch still short
        is filled with dropped groups. Every rank draws until every rank is full (one all-reduce a draw), so
        collective rollouts and the sampler's position agree. Each draw is scored once: the kept groups' rewards
        come back for step 2. -> (rows, prompts, rollout, logged stats, Rewarded or None: step 2 scores)."""
        if not self.cfg.algorithm.dynamic_sampling:
            return *self.rollout(), {}, None
        K, quota = self.K, self.prompts_per_rank
        kept, dropped = [], []  # whole groups: (rows, prompts, rollout, rewarded) of K rows each
        for draw in range(self.cfg.algorithm.max_draws):
            rows, prompts, rollout = self.rollout(draw)
            rewarded = self.side.reward_rows(rollout, prompts, rows)
            informative = (~tied_groups(rewarded.scores, rewarded.step_rewards, K)).tolist()
            for g, useful in enumerate(informative):
                group = slice(g * K, (g + 1) * K)
                (kept if useful else dropped).append((rows[group], prompts[group], select_rows(rollout, group),
                                                      rewarded.select(group)))
            (missing,) = self.rt.sum(float(max(0, quota - len(kept))))
            if missing == 0:
                break
        short = max(0, quota - len(kept))
        groups = kept[:quota] + dropped[:short]
        (topped_up,) = self.rt.sum(float(short))
        rollout = concat_rollouts([g[2] for g in groups], self.tokenizer.pad_token_id)
        return ([r for g in groups for r in g[0]], [p for g in groups for p in g[1]], rollout,
                {"sampling_draws": draw + 1, "sampling_topped_up_groups": topped_up},
                Rewarded.concat([g[3] for g in groups]))

    def rollout(self, draw: int = 0) -> tuple[list[dict], list[str], Rollout]:
        """This rank's prompts of the step's global draw, K contiguous samples each, from the rollout engine
        (draw > 0: dynamic sampling's further draws, with noise of their own)."""
        return self.side.rollout_part(self.step, self.sampler.take(self.cfg.rollout.prompts_per_step), self.rt.rank,
                                      draw)

    # ---------------------------------------------------------------- 2. score (+ reference, old log-probs, values)
    def score(self, rollout: Rollout, rewarded: Rewarded, logprobs_ref: torch.Tensor,
              logprobs_behaviour: torch.Tensor | None = None) -> Scored:
        """The batch with its rewards and reference log-probs, and the log-probs and values the update measures
        itself against. logprobs_behaviour (async): under the actor's weights that sampled the batch."""
        input_ids, attention_mask, mask = rollout.input_ids, rollout.attention_mask, rollout.response_mask
        P = rollout.prompt_ids.shape[1]
        scores, step_rewards, score_stats = rewarded.scores, rewarded.step_rewards, rewarded.stats()
        update_forward = None
        whole = torch.arange(input_ids.shape[0], device=input_ids.device)
        (split,) = self.rt.sum(float(len(micro_split(rollout, whole, self.memory.tokens, self.update_shares())) > 1))
        if self.single_pass and split == 0:
            # one update over every row, in one micro-batch: its own forward gives the old log-probs and values,
            with self.precision.autocast():  # detached: the numbers a separate no-grad forward computes, one fewer
                update_forward = self.forward(input_ids, attention_mask, P)
            logprobs_old, _, values_old = (t.detach() if t is not None else None for t in update_forward)
        elif self.sampler_logprobs_apply():  # never on an async learner: its sampler is an actor's
            # the sampler computed the behaviour policy's log-probs as it drew each token (same weights,
            # temperature and support; to float rounding: tests/test_logprobs.py), so no forward repeats them, for
            # one pass in micro-batches or several epochs alike; a critic's values still need its own
            logprobs_old = rollout.logprobs.to(self.dev_policy)
            values_old = self.no_grad_forward(rollout, policy=False)[1]
        else:  # in micro-batches of the no-grad budget
            logprobs_old, values_old = self.no_grad_forward(rollout)
        values_old = values_old * mask if values_old is not None else None
        kl_per_token = kl_k1(logprobs_old, logprobs_ref) * mask
        is_weights = None
        if self.engine.separate_weights:  # vllm: its log-probs against the training model's (logged), TIS weights
            is_weights, mismatch = truncated_is_weights(logprobs_old, rollout.logprobs, mask, self.cfg.rollout.is_cap)
            score_stats = score_stats | mismatch
        return Scored(rollout, input_ids, attention_mask, mask, P, scores, step_rewards, score_stats, logprobs_ref,
                      logprobs_old, values_old, kl_per_token, update_forward, is_weights=is_weights,
                      logprobs_behaviour=logprobs_behaviour)

    def update_shares(self) -> bool:
        """The update's forwards share prompts: the policy's do, and no separate critic runs whole rows beside it."""
        return self.ddp_critic is None and self.side.shares_prefix(self.ddp_policy, grad=True)

    def sampler_logprobs_apply(self) -> bool:
        """Sampled here by the training model itself (not vLLM's copy of the weights, not an async actor's), in fp32 (decoding and a whole forward agree to ~1e-5 a token; under bf16
        they differ by 0.03 a token on average, 0.005 biased: 0.3 nats of KL over 64 tokens, measured on SmolLM2),
        no value head on the policy: the sampler's log-probs are the old ones, whatever the epochs and minibatches
        (PPO's ratio is against the policy that sampled; a forward of the same weights repeats the sampler's numbers)."""
        return (not self.engine.separate_weights and self.shared is None and not self.actors.active
                and self.precision.compute is None and self.precision.weights == "fp32")

    def no_grad_forward(self, rollout: Rollout, policy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T) log-probs and values (None without a critic) of the policy before the update, in micro-batches
        (policy=False: the critic's values only; log-probs left 0)."""
        logprobs_old = torch.zeros(rollout.response_mask.shape, device=self.dev_policy)
        values_old = torch.zeros_like(logprobs_old) if self.critic is not None else None
        if not policy and self.critic is None:
            return logprobs_old, None
        rows = torch.arange(logprobs_old.shape[0], device=rollout.response_mask.device)
        shared = policy and self.ddp_critic is None and self.side.shares_prefix(self.ddp_policy, grad=False)
        for micro, counts in memory.same_count_everywhere(self.rt, self.ddp_policy if policy else self.ddp_critic,
                                                          micro_split(rollout, rows, self.memory.infer_tokens, shared)):
            ids, attn, P, _ = micro.inputs(rollout)
            with torch.no_grad(), self.precision.autocast():
                logprobs, _, values = (self.forward(ids, attn, P, with_entropy=False) if policy
                                       else (None, None, self.critic_values(ids, attn, P)))
            if counts and policy:
                logprobs_old[micro.rows, :micro.width] = logprobs
            if counts and values is not None:
                values_old[micro.rows, :micro.width] = values
        return logprobs_old, values_old

    def forward(self, ids: torch.Tensor, attn: torch.Tensor, P: int, with_entropy: bool = True):
        """Policy (and critic) over rollout rows of prompt width P -> (log-probs, entropies or None, values
        or None), each (B, T); with gradients unless under no_grad (entropies only where the loss uses them)."""
        cfg = self.cfg
        entropy_grad = cfg.algorithm.entropy_coef != 0
        if self.shared is not None:  # one forward for both
            return self.ddp_policy(ids, attn, P, cfg.rollout.temperature, with_entropy, entropy_grad)
        out = response_logprobs(self.ddp_policy, ids, attn, P, cfg.rollout.temperature, with_entropy, entropy_grad,
                                self.chunk, self.support)
        logprobs, entropy = out if with_entropy else (out, None)
        return logprobs, entropy, self.critic_values(ids, attn, P) if self.ddp_critic is not None else None

    def critic_values(self, ids: torch.Tensor, attn: torch.Tensor, P: int) -> torch.Tensor:
        """(B, T) the separate critic's V(s_t) of the states before each response token."""
        return self.ddp_critic(ids.to(self.dev_critic), attn.to(self.dev_critic))[:, P - 1:-1].to(self.dev_policy)

    # ---------------------------------------------------------------- 3. advantages
    def advantages(self, s: Scored) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """-> (token rewards, advantages, returns, each (B, T); the KL coefficient beta of this step)."""
        beta = self.kl_ctl.value
        kl_in_reward = (self.kl_estimator(s.logprobs_old, s.logprobs_ref) * s.mask if self.kl_in_reward
                        else torch.zeros_like(s.kl_per_token))
        # episodes: the environment's tokens off the time axis (algorithms/turns.py), so credit runs across turns
        packing = pack_index(s.mask) if s.rollout.context_mask is not None else None
        packed = (lambda x: pack(x, *packing)) if packing else (lambda x: x)
        mask, values_old = packed(s.mask), packed(s.values_old) if s.values_old is not None else None
        rewards = token_rewards(s.scores, packed(kl_in_reward), mask, beta, packed(s.step_rewards))
        if s.logprobs_behaviour is not None:  # async: corrected from the actor's weights to the learner's
            weights = truncated_importance_weights(s.logprobs_old, s.logprobs_behaviour, s.mask, self.cfg.rollout.rho_max)
        if s.logprobs_behaviour is not None and self.vtrace:  # V-trace: the estimator itself when on-policy
            advantages, returns = vtrace(rewards, values_old, mask, packed(weights), gamma=self.cfg.algorithm.gamma,
                                         lam=self.cfg.algorithm.lam, c_max=min(1.0, self.cfg.rollout.rho_max))
        else:
            # an episode's outcome is its whole return (turn rewards included): group baselines compare returns
            advantages, returns = self.estimate_advantages(rewards, values_old, mask, None if packing else s.scores)
        if packing:
            rewards, advantages, returns = (unpack(x, *packing, s.mask.shape[1]) for x in (rewards, advantages, returns))
        if self.cfg.algorithm.whiten_advantages:  # mean and variance over the real tokens of every rank's rows
            advantages = distributed.global_masked_whiten(advantages, s.mask, self.rt)
        if s.is_weights is not None:  # the policy-gradient term of each token, reweighted to pi_train (TIS)
            advantages = advantages * s.is_weights
        if s.logprobs_behaviour is not None:  # each token's policy-gradient term weighted by its rho (offpolicy.py)
            advantages = advantages * weights
        return rewards, advantages, returns, beta

    # ---------------------------------------------------------------- 4. update
    def update(self, s: Scored, advantages: torch.Tensor, returns: torch.Tensor, beta: float) -> dict:
        """algorithm.epochs passes of algorithm.minibatches optimizer steps -> the step's update metrics."""
        cfg, a = self.cfg, self.cfg.algorithm
        per_minibatch: dict[str, list[float]] = {}
        first_mb: dict[str, float] = {}
        n_rows = s.input_ids.shape[0]  # this rank's rows
        mb_size = n_rows // a.minibatches
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # FSDP2: the sharded ones
        stop_early = False
        for epoch in range(a.epochs):
            # each rank shuffles its own rows: minibatch m of the step is the union of the ranks' minibatch m
            order = (torch.arange(n_rows) if self.single_pass else
                     torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed + self.step * 997 + epoch)))
            for m in range(a.minibatches):
                idx = order[m * mb_size:(m + 1) * mb_size].to(self.dev_policy)
                means = self.minibatch_step(s, idx, advantages, returns, beta, params, first_mb, epoch == 0 and m == 0)
                for k, v in means.items():
                    per_minibatch.setdefault(k, []).append(v)
                if self.trust_region and a.target_kl is not None and means["approx_kl"] > a.target_kl:
                    stop_early = True
                    break
            if stop_early:
                break
        self.scheduler.step()
        self.step += 1
        return {**{k: sum(v) / len(v) for k, v in per_minibatch.items()}, **first_mb, "early_stop": int(stop_early)}

    def minibatch_step(self, s: Scored, idx: torch.Tensor, advantages, returns, beta: float, params,
                       first_mb: dict, first: bool) -> dict[str, float]:
        """One optimizer step on rows idx, in micro-batches of micro_batch_tokens whose gradients accumulate
        -> the minibatch's token means over every rank (+ grad_norm)."""
        a, rt = self.cfg.algorithm, self.rt
        mb_mask = s.mask[idx]
        all_tokens, all_units = rt.sum(float(mb_mask.sum()), local_units(mb_mask, a.loss_agg))
        micros = ([(None, True)] if s.update_forward is not None else
                  memory.same_count_everywhere(rt, self.ddp_policy, micro_split(s.rollout, idx, self.memory.tokens,
                                                                                self.update_shares())))
        loss_part, sums = 0.0, {}
        for k, (micro, counts) in enumerate(micros):
            last = k == len(micros) - 1
            with self._no_sync(last):
                part, stats, tokens = self.micro_step(s, micro, idx, advantages, returns, beta, first_mb, first,
                                                      all_tokens, all_units, counts)
            loss_part += part
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value * tokens
        # the loss over every rank's rows (each term by its own units) and token means of the stats (one
        # all-reduce): the guard, early stop and logs agree on all ranks
        loss_total, *totals = rt.sum(loss_part, *sums.values())
        means = {"loss": loss_total, **{k: total / max(all_tokens, 1.0) for k, total in zip(sums, totals)}}
        grad_norm, applied = self.guard.step(params, self.optimizer, means["loss"], scaler=self.precision.scaler,
                                             at_step=self.step + 1)
        if first and self.trust_region:
            first_mb.update(first_mb_clip_frac=means["clip_frac"], first_mb_approx_kl=means["approx_kl"])
        return {**means, "grad_norm": grad_norm}

    def micro_step(self, s: Scored, micro: Micro | None, idx, advantages, returns, beta: float, first_mb: dict,
                   first: bool, all_tokens: float, all_units: float, counts: bool) -> tuple[float, dict, float]:
        """Forward and backward of one micro-batch (None: the whole batch, whose forward step 2 kept), each
        term weighted by its share of the minibatch over every rank -> (its part of the loss, its token-mean
        stats, its tokens)."""
        a, rt = self.cfg.algorithm, self.rt
        if micro is None:
            rows, width = idx, s.mask.shape[1]
            logprobs, entropy, values = s.update_forward
        else:
            rows, width = micro.rows, micro.width
            ids, attn, P, _ = micro.inputs(s.rollout)
            with self.precision.autocast():
                logprobs, entropy, values = self.forward(ids, attn, P)
        mask = s.mask[rows, :width]
        tokens, units = (float(mask.sum()), local_units(mask, a.loss_agg)) if counts else (0.0, 0.0)
        # DDP averages the ranks' gradients: weighting each micro-batch's loss by its share of the minibatch's
        # tokens (or responses, by algorithm.loss_agg) over every rank makes the sum the loss over every row
        share = rank_share(tokens, all_tokens, rt.world_size)  # the value loss: a token mean
        agg_share = rank_share(units, all_units, rt.world_size)  # the policy's terms: by algorithm.loss_agg
        logprobs_old, logprobs_ref = s.logprobs_old[rows, :width], s.logprobs_ref[rows, :width]
        pg_loss, pg_stats = self.policy_loss(logprobs, logprobs_old, advantages[rows, :width], mask)
        if first and self.trust_region:  # checklist 2: ratio 1, clip 0, approx-KL 0 before any update
            ratio_dev = ((logprobs.detach() - logprobs_old).exp() - 1).abs() * mask
            first_mb["first_mb_ratio_dev"] = max(first_mb.get("first_mb_ratio_dev", 0.0), float(ratio_dev.max()))
        entropy_mean = masked_mean(entropy, mask)  # logged: the entropy per token
        entropy_term = self.aggregate(entropy, mask)  # as verl: the policy's terms aggregate alike
        kl_penalty = (0.0 if self.kl_in_reward else
                      beta * self.aggregate(self.kl_estimator(logprobs, logprobs_ref), mask))
        v_loss = (value_loss(values, s.values_old[rows, :width], returns[rows, :width], mask,
                             a.value_clip if self.trust_region else None) if values is not None else None)
        # the total loss: policy gradient - entropy bonus + KL penalty (k2 / k3: in the loss) + value loss (critic)
        policy_terms = pg_loss - a.entropy_coef * entropy_term + kl_penalty
        value_term = a.value_coef * v_loss if v_loss is not None else 0.0
        stats = {"entropy": entropy_mean, **pg_stats} | ({"value_loss": v_loss} if v_loss is not None else {})
        self.precision.backward(policy_terms * agg_share + value_term * share)
        loss_part = (float(torch.as_tensor(policy_terms).detach()) * units / max(all_units, 1.0)
                     + float(torch.as_tensor(value_term).detach()) * tokens / max(all_tokens, 1.0))
        return loss_part, {k: float(v.detach()) for k, v in stats.items()}, tokens

    def _no_sync(self, sync: bool):
        """DDP / FSDP2: the gradient all-reduce on the minibatch's last micro-batch only (policy and critic)."""
        stack = contextlib.ExitStack()
        for model in (self.ddp_policy, self.ddp_critic):
            if model is not None:
                stack.enter_context(distributed.no_sync(model, sync))
        return stack

    # ---------------------------------------------------------------- 5. metrics
    def step_metrics(self, s: Scored, rewards: torch.Tensor, returns: torch.Tensor, beta: float,
                     update_stats: dict, times: tuple[float, float, float, float]) -> dict:
        """Per-row means over every rank's rows (one all-reduce), the KL controller's update -> the step's metrics
        (logged by loop.end_of_step)."""
        cfg, rt, mask = self.cfg, self.rt, s.mask
        n_rows = s.input_ids.shape[0]
        flat_groups = float(tied_groups(s.scores, s.step_rewards, self.K).sum()) * self.K
        row_sums = {"score": float(s.scores.sum()), **{k: float(v) * n_rows for k, v in s.score_stats.items()},
                    "zero_signal_group_frac": flat_groups,
                    "reward_with_kl": float(rewards.sum()), "kl": float(masked_sum(s.kl_per_token, mask)),
                    "response_len": float(mask.sum()), "stop_fraction": float(s.rollout.stopped.float().sum())}
        if s.logprobs_behaviour is not None:  # async: pi_prox / mu per token (1 on-policy) and how often it was cut
            ratio, tokens = (s.logprobs_old - s.logprobs_behaviour).exp(), mask.sum(-1).clamp(min=1)
            row_sums["is_ratio"] = float(((ratio * mask).sum(-1) / tokens).sum())
            row_sums["is_truncated_frac"] = float((((ratio > cfg.rollout.rho_max) * mask).sum(-1) / tokens).sum())
        all_rows, *totals = rt.sum(n_rows, *row_sums.values())
        row_means = {k: total / all_rows for k, total in zip(row_sums, totals)}
        self.kl_ctl.update(row_means["kl"], int(all_rows))  # the global KL
        t0, t1, t2, t3 = times
        early_stop = update_stats.pop("early_stop")
        metrics = {
            **row_means, "kl_coef": beta, **update_stats,
            "samples_per_s": all_rows / (t3 - t0), "tokens_per_s": row_means["response_len"] * all_rows / (t3 - t0),
            "time_rollout_frac": (t1 - t0) / (t3 - t0), "time_score_frac": (t2 - t1) / (t3 - t0),
            "time_update_frac": (t3 - t2) / (t3 - t0), "lr": self.scheduler.get_last_lr()[0], "early_stop": early_stop,
        }
        if s.values_old is not None:
            metrics["explained_variance"] = distributed.global_explained_variance(s.values_old, returns, mask, rt)
        return metrics

    def evaluate(self) -> loop.Evaluation:
        """Greedy held-out responses from the rollout engine: accuracy, length, the reward model's score."""
        # FSDP2: every rank gathers the weights (the reward model's too), rank 0 evaluates
        self.engine.sync_weights(self.policy)  # vllm: the weights of the last update (collective)
        with distributed.gathered(self.policy), distributed.gathered(self.reward_model):
            if not self.rt.is_main:
                return loop.Evaluation({})
            if self.env_cls is not None:  # episodes: the share the environment called solved, turns, its return
                episode_metrics, samples, _ = episode_accuracy(
                    self.engine, self.tokenizer, self.env_cls, self.eval_rows, self.eval_prompts, self.cfg.eval,
                    self.cfg.env, self.dev_policy, self.max_sequence)
                if self.cfg.eval.samples:  # eval.samples=K: pass@1, pass@k of K sampled episodes a row
                    episode_metrics |= sampled_episode_accuracy(
                        self.engine, self.tokenizer, self.env_cls, self.eval_rows, self.eval_prompts, self.cfg.eval,
                        self.cfg.env, self.dev_policy, self.max_sequence, self.cfg.seed)[0]
                return loop.Evaluation({f"eval_{k}": v for k, v in episode_metrics.items()}, samples)
            accuracy, samples, mean_len, responses = held_out_accuracy(
                self.engine, self.tokenizer, self.eval_rows, self.eval_prompts, self.cfg.eval, self.dev_policy,
                self.max_sequence)
            metrics = {"eval_response_chars": mean_len}
            if accuracy is not None:
                metrics["eval_accuracy"] = accuracy
            metrics |= stage_sampled_metrics(self.engine, self.tokenizer, self.eval_rows, self.eval_prompts,
                                             self.cfg.eval, self.dev_policy, self.cfg.seed,  # eval.samples: pass@k, maj@k
                                             self.max_sequence)
            if self.rm_source is not None:  # the RM's (normalised) score of the greedy held-out responses
                metrics["eval_rm_score"] = float(self.rm_source.score(self.eval_prompts, responses,
                                                                      self.eval_rows).values.mean())
            return loop.Evaluation(metrics, samples)

    def save_checkpoint(self) -> None:
        loop.save_checkpoint(self, kl=self.kl_ctl, running_mean=self.running_mean)

    # ================================================================ save
    def save(self, last: loop.Evaluation, before: loop.Evaluation) -> dict:
        cfg, rt, run_dir, step = self.cfg, self.rt, self.run_dir, self.step
        manifest = loop.final_manifest(self, "rl", last, before) | lora.manifest_entry(self.adapters)
        manifest |= {  # sft_run: the policy's run under rl's own name (kept: readers of rl manifests use it)
            "sft_run": manifest["parent_run"], "algorithm": cfg.algorithm.name, "reward_model": cfg.reward.model.path,
            "rm_run": checkpoint.read_manifest(cfg.reward.model.path).get("run_dir"),
            "reward_functions": list(cfg.reward.functions), "parameters_held": self.held}
        checkpoint.save_final(run_dir, rt, self.policy, self.tokenizer, manifest,  # collective; rank 0 writes
                              hf_model=self.adapters.final_model() if self.adapters else None)
        results, before = last.metrics, before.metrics
        table = {}
        if "eval_accuracy" in results:
            table["held-out accuracy before"] = before.get("eval_accuracy", "(resumed)")
            table["held-out accuracy after"] = results["eval_accuracy"]
        table["algorithm"] = cfg.algorithm.name
        loop.report("rl", rt, self.tracker, run_dir, table, step, self.t_start, "held-out samples (greedy)",
                    last.samples)
        return results


def run(cfg, output_dir: Path) -> dict:
    if cfg.rollout.mode == "async":  # actor ranks generate and score, learner ranks run this recipe's train()
        return actors.run_async(cfg, output_dir, RLRecipe, actor_side)
    return loop.run_stage("rl", cfg, output_dir, RLRecipe, model_key="policy", placement=cfg.placement)


def actor_side(cfg, rt, run_dir, t_start: float, learners: int) -> RolloutSide:
    """An async actor rank's rollout side: the recipe's setup up to step 2, nothing of the learner's."""
    return RLRecipe(cfg, rt, run_dir, t_start, learners=learners).setup_rollout_side()
