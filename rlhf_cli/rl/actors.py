"""rollout.mode=async: actor ranks generate and score while learner ranks train (A3C; IMPALA's actor-learner split).

    torchrun --nproc-per-node 2 -m rlhf_cli rl device=cpu device.threads=1 rollout.mode=async      # 1 actor, 1 learner
    torchrun --nproc-per-node 8 -m rlhf_cli rl algorithm=a2c rollout.mode=async rollout.actors=4 rollout.max_lag=2

Layout: of W ranks the last `rollout.actors` (N) are actors, ranks 0..L-1 (L = W - N) learners. The learners
run the RL recipe (stages/rl.py) with DDP among themselves (a torch.distributed sub-group); the actors run
`act` on the rollout side the synchronous recipe calls too (rollout_side.py): steps 1 and 2 (rollout,
rewards from rule functions and the reward model, the reference's log-probs and the behaviour log-probs)
with a copy of the policy. An actor holds that side alone, no recipe.

What travels, all over torch.distributed point-to-point (gloo on CPU, nccl on GPU):
- weights, learner rank 0 -> every actor: the policy's parameters as one flat tensor with their version
  (the number of updates behind them), at the start and after every `rollout.sync_every`-th update.
- batches, actor -> learner: step s's share of learner l (the same prompts and keyed noise the synchronous
  run gives rank l at step s), its rewards, reference and behaviour log-probs, and the version that made it.
  Batch (s, l) is the (s*L + l)-th of the run and actor (s*L + l) mod N makes it: actors work on successive
  steps side by side and each learner receives its batches in step order.

Staleness: an actor generates the batch of step s with weights of version >= s - rollout.max_lag, waiting
for newer weights when it has none (a stale batch waits; none is ever dropped, so no generation is wasted
and the drop rate is 0 by construction). As actors take new weights only when the bound asks for them, in
steady state they run at the lag max_lag (lag 1 is what overlapping needs: step s is generated while the
learners update step s - 1). max_lag=0 serialises the two sides: every batch comes from the learners'
current weights, the importance weights are 1 and the updates are the synchronous algorithm's.

Correction (algorithms/offpolicy.py): the learner's loss keeps its own ratio to the proximal policy (its
weights before the update), and each token's advantage is weighted by min(rho_max, pi_prox / mu) (truncated
importance sampling, IMPALA; decoupled PPO for ppo); with a critic (gae) the advantages and the critic's
targets are V-trace's.

Resume: learners checkpoint as in sync mode; actors hold no state. A rerun resumes the learners from their
newest checkpoint and the actors start from its weights and step: batches in flight at the kill are
generated again (with the same prompts and noise), and a step counts once, when its update is checkpointed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from rlhf_cli import data
from rlhf_cli.engines.rollout import Rollout
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import model_path
from rlhf_cli.rewards.sources import score_stat_names
from rlhf_cli.rl.rollout_side import Rewarded, RolloutSide
from rlhf_cli.training import loop, runtime, signals
from rlhf_cli.training.checkpoint import RunDir
from rlhf_cli.training.precision import check_trainable_dtype

HEADER = 9  # int64: step, version, B, P, T, generate / score / wait microseconds, actor rank


def check_layout(cfg, world_size: int) -> None:
    """Before anything starts: a layout with at least one actor and one learner rank, or one line saying how."""
    actors = cfg.rollout.actors
    if world_size < 2:
        raise ConfigError(f"rollout.mode=async needs 2 or more processes (rollout.actors={actors} actor rank(s) and "
                          f"at least one learner rank), and this is one: launch it with torchrun --nproc-per-node "
                          f"{actors + 1} -m rlhf_cli rl ..., or use rollout.mode=sync")
    if actors > world_size - 1:
        raise ConfigError(f"rollout.actors={actors} leaves no learner rank among the {world_size} processes: set "
                          f"rollout.actors={world_size - 1} or less (world size - 1), or launch more processes")


@dataclass(frozen=True)
class Layout:
    """Ranks 0..L-1 learn, ranks L..W-1 act; batch (step, learner) comes from actor (step*L + learner) mod N."""
    world_size: int
    actors: int

    @property
    def learners(self) -> int:
        return self.world_size - self.actors

    def actor_rank(self, step: int, learner: int) -> int:
        return self.learners + (step * self.learners + learner) % self.actors

    def parts_of(self, rank: int, step: int) -> list[int]:
        """The learners whose share of `step` actor `rank` makes."""
        return [part for part in range(self.learners) if self.actor_rank(step, part) == rank]


def weight_versions(start: int, max_steps: int, sync_every: int) -> list[int]:
    """The versions learner rank 0 sends: the start, then every sync_every-th update that a batch can use."""
    return [start] + [v for v in range(start + 1, max_steps) if v % sync_every == 0]


@dataclass
class Received:
    """An actor's batch on a learner: what steps 1 and 2 of the synchronous recipe would have made there."""
    rollout: Rollout
    rewarded: Rewarded  # the rewards of each row, as the rollout side computed them
    logprobs_ref: torch.Tensor  # (B, T)
    logprobs_behaviour: torch.Tensor  # (B, T) under the weights that sampled the batch (version `version`)
    version: int


# ---------------------------------------------------------------- the run: split the ranks, then learn or act


def run_async(cfg, output_dir, make_recipe, make_side) -> dict:
    """loop.run_stage for rollout.mode=async: learner ranks set up and train the recipe on a learner sub-group,
    actor ranks build the rollout side (make_side(cfg, rt, run_dir, t_start, learners) -> RolloutSide) and
    `act` with it. -> the final metrics (learners), {} (actors)."""
    t_start = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world_size)
    check_trainable_dtype(cfg.policy, "policy", cfg.placement.policy or cfg.device.type)
    world = runtime.setup(cfg.device, cfg.seed, cfg.placement)  # every device resolved before anything loads
    layout = Layout(world_size, cfg.rollout.actors)
    learner_group = dist.new_group(list(range(layout.learners)))  # collective: every rank calls it
    try:
        model_path(cfg.policy, output_dir, cfg.seed, world)  # the embedded tiny model: written once, then read
        if world.rank < layout.learners:
            return learn(cfg, output_dir, make_recipe, t_start,
                         dataclasses.replace(world, world_size=layout.learners, group=learner_group), layout)
        # an actor is a world of its own for collectives (none); its global rank is never 0: it writes nothing
        side = make_side(cfg, dataclasses.replace(world, world_size=1), RunDir(output_dir, {}, "rl", False),
                         t_start, layout.learners)
        try:
            act(side, layout)
        except RuntimeError:  # a learner closed its ends: after a SIGTERM / SIGINT it checkpointed and stopped
            signum = signals.stop_requested()
            if signum is None:
                raise
            raise signals.Interrupted(signum, "") from None  # rank 0 (a learner) says where to resume
        return {}
    finally:
        runtime.teardown()


def learn(cfg, output_dir, make_recipe, t_start: float, rt, layout: Layout) -> dict:
    """A learner rank: loop.train_recipe with the recipe linked to the actors (it says the layout)."""
    return loop.train_recipe("rl", cfg, output_dir, rt, make_recipe, t_start,
                             actors=LearnerLink(cfg, layout, rt.rank))


# ---------------------------------------------------------------- the learner's side


class LearnerLink:
    """A learner's ends: receive its batch of each step; rank 0 also sends the weights."""

    active = True

    def __init__(self, cfg, layout: Layout, rank: int):
        self.cfg, self.layout, self.rank = cfg, layout, rank
        self.versions: list[int] | None = None  # what rank 0 sends, fixed by the start step
        self.sends: list = []  # rank 0's outstanding weight sends (their buffers stay alive until close)

    def describe(self) -> str:
        layout, cfg = self.layout, self.cfg
        return (f"rl: rollout.mode=async: {layout.learners} learner rank(s) (0..{layout.learners - 1}) + "
                f"{layout.actors} actor rank(s); weights to the actors every {cfg.rollout.sync_every} update(s), "
                f"batches at most {cfg.rollout.max_lag} update(s) old")

    def publish(self, policy: torch.nn.Module, version: int) -> None:
        """Learner rank 0, after `version` updates: the weights to every actor when this version is sent."""
        if self.versions is None:
            self.versions = weight_versions(version, self.cfg.max_steps, self.cfg.rollout.sync_every)
        if self.rank != 0 or version not in self.versions:
            return
        device = next(policy.parameters()).device
        flat = parameters_to_vector([p.detach() for p in policy.parameters()]).clone()  # a copy: updates go on
        header = torch.tensor([version], dtype=torch.int64, device=device)
        for actor in range(self.layout.learners, self.layout.world_size):
            self.sends += [dist.isend(header, actor), dist.isend(flat, actor)]

    def receive(self, step: int, device: torch.device) -> tuple[Received, dict]:
        """This learner's batch of `step` from the actor that makes it (blocks until it arrives)
        -> (the batch, logged stats: its lag, the learner's wait, the actor's times)."""
        source = self.layout.actor_rank(step, self.rank)
        t0 = time.perf_counter()
        header = torch.empty(HEADER, dtype=torch.int64, device=device)
        dist.recv(header, source)
        batch_step, version, B, P, T, generate_us, score_us, wait_us, _ = header.tolist()
        stats = score_stat_names(self.cfg.reward)
        payload = torch.empty(payload_size(B, P, T, len(stats)), dtype=torch.float64, device=device)
        dist.recv(payload, source)
        waited = time.perf_counter() - t0
        assert batch_step == step, (batch_step, step)  # the layout fixes who sends what, in step order
        received = unpack(payload, B, P, T, version, stats)
        busy = (generate_us + score_us) / max(generate_us + score_us + wait_us, 1)
        return received, {"async_lag": step - version, "async_learner_wait_s": waited,
                          "async_actor_generate_s": generate_us / 1e6, "async_actor_score_s": score_us / 1e6,
                          "async_actor_wait_s": wait_us / 1e6, "async_actor_busy_frac": busy}

    def close(self) -> None:
        """Every weight send delivered (the actors receive each version before they finish)."""
        for work in self.sends:
            work.wait()
        self.sends = []


# ---------------------------------------------------------------- the actor's side


def act(side: RolloutSide, layout: Layout) -> None:
    """An actor rank: for each step from the learners' start, its batches (layout.parts_of), each generated with
    weights at most rollout.max_lag updates old, scored, and sent to its learner; then the last weights drained."""
    cfg, rank = side.cfg, side.rt.rank
    policy, device = side.policy, side.dev_policy
    flat = parameters_to_vector([p.detach() for p in policy.parameters()]).clone()  # the receive buffer

    def receive_weights() -> int:
        header = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(header, 0)
        dist.recv(flat, 0)
        with torch.no_grad():
            vector_to_parameters(flat, policy.parameters())
        return int(header.item())

    version = start = receive_weights()
    versions = weight_versions(start, cfg.max_steps, cfg.rollout.sync_every)
    sampler = data.EpochSampler(len(side.train_rows), cfg.seed)  # the learners' draws: step s takes the s-th
    for _ in range(start):
        sampler.take(cfg.rollout.prompts_per_step)
    sends = []
    for step in range(start, cfg.max_steps):
        step_prompts = sampler.take(cfg.rollout.prompts_per_step)
        for part in layout.parts_of(rank, step):
            t0 = time.perf_counter()
            while version < step - cfg.rollout.max_lag:  # too old for this step: wait for the learners' next
                version = receive_weights()
            t1 = time.perf_counter()
            rows, prompts, rollout = side.rollout_part(step, step_prompts, part)              # 1. rollout
            t2 = time.perf_counter()
            rewarded, logprobs_ref, logprobs_behaviour = side.score_part(rollout, prompts, rows)  # 2. score
            t3 = time.perf_counter()
            B, P = rollout.prompt_ids.shape
            T = rollout.response_ids.shape[1]
            header = torch.tensor([step, version, B, P, T, int((t2 - t1) * 1e6), int((t3 - t2) * 1e6),
                                   int((t1 - t0) * 1e6), rank], dtype=torch.int64, device=device)
            payload = pack(rollout, rewarded, logprobs_ref, logprobs_behaviour, device, score_stat_names(side.cfg.reward))
            sends += [dist.isend(header, part), dist.isend(payload, part)]  # the learner rank `part`
    while version < versions[-1]:  # every version rank 0 sends is received: its sends complete
        version = receive_weights()
    for work in sends:
        work.wait()


# ---------------------------------------------------------------- a batch as one float64 tensor


def payload_size(B: int, P: int, T: int, n_stats: int) -> int:
    return 2 * B * P + 6 * B * T + 2 * B + n_stats * B


def pack(rollout: Rollout, rewarded: Rewarded, logprobs_ref, logprobs_behaviour, device,
         stats: tuple[str, ...]) -> torch.Tensor:
    """Ids, masks, flags, rewards (per row, every stat named in `stats`: score_stat_names) and log-probs as one
    float64 vector (ids below 2**53 and fp32 values are exact)."""
    parts = [rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, rollout.response_mask, rollout.logprobs,
             rollout.stopped, rewarded.scores, rewarded.step_rewards, logprobs_ref, logprobs_behaviour,
             *(rewarded.row_stats[k] for k in stats)]
    return torch.cat([p.to(device=device, dtype=torch.float64).reshape(-1) for p in parts])


def unpack(payload: torch.Tensor, B: int, P: int, T: int, version: int, stats: tuple[str, ...]) -> Received:
    """pack's inverse, each tensor at the dtype the synchronous recipe has (ids long, masks and values fp32)."""
    sizes = [B * P, B * P, B * T, B * T, B * T, B, B, B * T, B * T, B * T] + [B] * len(stats)
    (prompt_ids, prompt_mask, response_ids, response_mask, logprobs, stopped, scores, step_rewards, logprobs_ref,
     logprobs_behaviour, *values) = torch.split(payload, sizes)
    rollout = Rollout(prompt_ids.long().view(B, P), prompt_mask.long().view(B, P), response_ids.long().view(B, T),
                      response_mask.float().view(B, T), logprobs.float().view(B, T), stopped.bool())
    row_stats = {k: v.float() for k, v in zip(stats, values)}
    return Received(rollout, Rewarded(scores.float(), step_rewards.float().view(B, T), row_stats),
                    logprobs_ref.float().view(B, T), logprobs_behaviour.float().view(B, T), version)
