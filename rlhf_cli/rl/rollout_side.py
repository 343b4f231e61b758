"""The rollout side of an RL step: step 1 (sampling) and step 2's rewards, reference and behaviour log-probs.

The synchronous recipe (stages/rl.py) and the async actor ranks (actors.py) both call it: the recipe builds
it in `setup_rollout_side` from what it loaded (data, tokenizer, policy and engine, reference, reward sources)
and calls it every step; an actor rank gets this object alone (`actors.act(side, layout)`), never the
recipe. The step is a parameter of each call (it keys the sampling noise), not state the caller sets.

    rows, prompts, rollout = side.rollout_part(step, step_prompts, part)   # 1. sample part `part` of a draw
    rewarded = side.reward_rows(rollout, prompts, rows)                    # 2. rules + reward model, per row
    logprobs_ref = side.logprobs_under(side.reference, side.dev_ref, rollout)

Reward sources (rewards/sources.py): rule and process-reward functions by dotted path and the reward model,
one list; `Rewarded` carries their per-row values, under the names rewards.sources.score_stat_names gives (what
an actor's batch carries to its learner, row by row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cli import data
from rlhf_cli.algorithms import overlong_penalty, place_step_rewards
from rlhf_cli.engines.episodes import episode_stats, run_episodes
from rlhf_cli.engines.rollout import Rollout, SamplingParams, decode_responses
from rlhf_cli.models.logprobs import Support, distinct_prompts, prefix_cache, response_logprobs
from rlhf_cli.rewards.sources import source_stats
from rlhf_cli.training import distributed, memory
from rlhf_cli.training.precision import Precision

def char_to_token_ends(tokenizer, response_ids: list[int]) -> list[int]:
    """Decoded text length after each token (to place process rewards on step ends)."""
    return [len(tokenizer.decode(response_ids[: t + 1], skip_special_tokens=True)) for t in range(len(response_ids))]


@dataclass
class Micro:
    """One micro-batch of rollout rows: `rows` (b,) indices into the rank's rows, the prompt's left padding and the
    responses' right padding beyond these rows' longest cut (position ids come from the attention mask, so
    values are those of the uncut rows)."""
    rows: torch.Tensor  # (b,)
    prompt: int  # prompt columns kept (the longest prompt of these rows)
    width: int  # response columns kept (the longest response of these rows)

    def inputs(self, rollout) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """-> input_ids and attention_mask (b, prompt + width), the prompt width, the (b, width) response mask."""
        P = rollout.prompt_ids.shape[1]
        cols = slice(P - self.prompt, P + self.width)
        return (rollout.input_ids[self.rows, cols], rollout.attention_mask[self.rows, cols], self.prompt,
                rollout.response_mask[self.rows, :self.width])


# a prompt position copied to a row (shared prefix) holds its keys and values in every layer, expanded to every
# head: ~5% of a token's activations on SmolLM2-135M, less on wider models; counted as 1/8 of a token
KV_COPY_SHARE = 8


def micro_cost(prompt_width: int, response_width: int, rows: int, prompts: int, shared: bool) -> int:
    """The padded tokens a micro-batch's forward holds: rows x (prompt + response) when rows run whole; with a
    shared prefix (logprobs.shared_prefix_inputs), each distinct prompt once, every row's response, and the
    prompt's keys and values copied to each row (KV_COPY_SHARE)."""
    if not shared:
        return rows * (prompt_width + response_width)
    return prompts * prompt_width + rows * response_width + -(-rows * prompt_width // KV_COPY_SHARE)


def micro_split(rollout, rows: torch.Tensor, tokens: int, shared: bool = False) -> list[Micro]:
    """Rows `rows` of a rollout (anything with its prompt ids and masks; an episode's real_mask, the environment's
    tokens included, where it has one) in micro-batches of at most `tokens` padded tokens (micro_cost; shared:
    the forward runs each distinct prompt once), each micro-batch's prompt and response padding cut to its own
    longest. The rows of one prompt stay together (split only where a prompt's rows alone pass the budget),
    prompts longest first, so that like lengths share a micro-batch."""
    prompt_len = rollout.prompt_mask[rows].sum(-1).long().tolist()
    real = getattr(rollout, "real_mask", rollout.response_mask)  # episodes: the environment's tokens too
    response_len = real[rows].sum(-1).long().clamp(min=1).tolist()
    prompt = distinct_prompts(rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.prompt_ids.shape[1])[2]
    members: dict[int, list[int]] = {}
    for i, g in enumerate(prompt.tolist()):
        members.setdefault(g, []).append(i)
    longest = {g: prompt_len[m[0]] + max(response_len[i] for i in m) for g, m in members.items()}
    micros, current, width = [], [], (0, 0, 0)  # width: (prompt, response, distinct prompts) of `current`

    def cost(rows_in: list[int], p: int, t: int, n_prompts: int) -> int:
        return micro_cost(p, t, len(rows_in), n_prompts, shared)

    for g in sorted(members, key=lambda g: (-longest[g], g)):
        m = members[g]
        p, t = max(width[0], prompt_len[m[0]]), max(width[1], max(response_len[i] for i in m))
        if current and cost(current + m, p, t, width[2] + 1) <= tokens:  # the whole prompt joins
            current, width = current + m, (p, t, width[2] + 1)
            continue
        if current:
            micros.append(current)
            current, width = [], (0, 0, 0)
        for i in m:  # a micro-batch of its own, split row by row where it passes the budget
            p, t = max(width[0], prompt_len[i]), max(width[1], response_len[i])
            if current and cost(current + [i], p, t, 1) > tokens:
                micros.append(current)
                current, p, t = [], prompt_len[i], response_len[i]
            current, width = current + [i], (p, t, 1)
    if current:
        micros.append(current)
    return [Micro(rows[g], max(prompt_len[i] for i in g), max(response_len[i] for i in g)) for g in micros]


@dataclass
class Rewarded:
    """The rewards of B rollout rows, per row: what dynamic sampling scored a draw with and the step reuses for
    the groups it kept (no reward function runs twice on a response), and what an actor sends its learner."""
    scores: torch.Tensor  # (B,) sequence scores: rules + reward model + no-stop penalty
    step_rewards: torch.Tensor  # (B, T) process rewards on the tokens ending each step
    row_stats: dict  # name in rewards.sources.score_stat_names -> (B,) per-row values of the logged means

    def stats(self) -> dict:
        return {k: v.mean() for k, v in self.row_stats.items()}

    def select(self, rows: slice) -> "Rewarded":
        return Rewarded(self.scores[rows], self.step_rewards[rows], {k: v[rows] for k, v in self.row_stats.items()})

    @staticmethod
    def concat(parts: list["Rewarded"]) -> "Rewarded":
        """Stacked row-wise; step rewards padded on the right with 0 to the widest T, as concat_rollouts pads."""
        width = max(p.step_rewards.shape[1] for p in parts)
        return Rewarded(torch.cat([p.scores for p in parts]),
                        torch.cat([torch.nn.functional.pad(p.step_rewards, (0, width - p.step_rewards.shape[1]))
                                   for p in parts]),
                        {k: torch.cat([p.row_stats[k] for p in parts]) for k in parts[0].row_stats})


@dataclass
class RolloutSide:
    """What steps 1 and 2 of an RL step read, loaded once (stages/rl.py `setup_rollout_side` builds it)."""
    cfg: object  # the rl stage's config
    rt: object  # runtime.Runtime of this process (an actor: a world of its own)
    learners: int  # the ranks a step's prompts are split over
    tokenizer: object
    train_rows: list[dict]
    train_prompts: list[str]  # rendered prompt texts (chat template applied)
    train_prompt_ids: list[list[int]]  # their ids, cut from the left to leave room for the response
    policy: torch.nn.Module  # the weights the engine samples from (unwrapped)
    engine: object  # rollout.RolloutEngine
    precision: Precision
    memory: memory.MemoryPlan
    dev_policy: torch.device
    dev_ref: torch.device
    dev_reward: torch.device
    reference: torch.nn.Module | None  # None on an async learner (its actors send the reference's log-probs)
    reward_sources: list  # rewards.sources.RewardSource: rule functions, process rewards, the reward model
    support: Support  # the ids the engine can draw (log-probs are over them)
    chunk: int | None  # log-prob chunking (logprobs.response_terms)
    env_cls: type | None = None  # env.name's class: rollouts are multi-turn episodes (engines/episodes.py)
    max_sequence: int = 0  # prompt + episode fit in it (policy.max_length, the model's positions)

    @property
    def K(self) -> int:
        return self.cfg.rollout.samples_per_prompt

    @property
    def prompts_per_rank(self) -> int:
        return self.cfg.rollout.prompts_per_step // self.learners

    @property
    def rows_per_rank(self) -> int:
        return self.prompts_per_rank * self.K

    # ---------------------------------------------------------------- 1. rollout
    def rollout_part(self, step: int, step_prompts: list[int], part: int,
                     draw: int = 0) -> tuple[list[dict], list[str], Rollout]:
        """Part `part` (a rank's share; async: a learner's) of step `step`'s global draw `step_prompts`, K
        contiguous samples a prompt. Token t of global row g is drawn with noise keyed by (seed, step, g)
        (draw > 0: dynamic sampling's further draws, with noise of their own)."""
        cfg, K = self.cfg, self.K
        chosen = step_prompts[part * self.prompts_per_rank:(part + 1) * self.prompts_per_rank]
        rows = [self.train_rows[i] for i in chosen for _ in range(K)]
        prompts = [self.train_prompts[i] for i in chosen for _ in range(K)]
        prompt_ids = [self.train_prompt_ids[i] for i in chosen for _ in range(K)]
        params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_k,
                                cfg.rollout.top_p, noise_key=(cfg.seed, step, (draw * self.learners + part)
                                                              * self.rows_per_rank))
        self.engine.sync_weights(self.policy)
        with distributed.gathered(self.policy), self.precision.autocast():  # FSDP2: ranks stop at different lengths
            if self.env_cls is not None:  # multi-turn: every live episode a turn a generate call (episodes.py)
                rollout = run_episodes(self.engine, self.tokenizer, self.env_cls, rows, prompt_ids, params,
                                       cfg.env.turns(self.env_cls), self.max_sequence, cfg.env.timeout_s,
                                       self.dev_policy)
            else:
                ids, mask = data.left_pad(prompt_ids, self.tokenizer.pad_token_id)
                rollout = self.engine.generate(ids.to(self.dev_policy), mask.to(self.dev_policy), params)
        return rows, prompts, rollout

    # ---------------------------------------------------------------- 2. rewards and frozen log-probs
    def reward_rows(self, rollout: Rollout, prompts: list[str], rows: list[dict]) -> Rewarded:
        """Every reward source's score of each row, weighted (outcome rewards on the sequence score, process
        rewards on the token holding each step's last character), the no-stop and overlong penalties, and the
        per-row values of the logged means (rewards.sources.source_stats)."""
        cfg, tokenizer = self.cfg, self.tokenizer
        texts = decode_responses(tokenizer, rollout)
        B, T = rollout.response_ids.shape
        scores = torch.zeros(B)
        step_values, step_positions = [[] for _ in range(B)], [[] for _ in range(B)]
        lengths = rollout.response_mask.sum(-1).long().tolist()
        scored = [source.score(prompts, texts, rows) for source in self.reward_sources]
        # the response the rules read: the whole response, or an episode's last assistant turn [start, end)
        spans = ([e.turns[-1] for e in rollout.episodes] if rollout.episodes is not None
                 else [(0, n) for n in lengths])
        for source, out in zip(self.reward_sources, scored):
            scores += (source.weight * out.outcome).to(scores.dtype)
            for b, steps in enumerate(out.steps):
                start, end = spans[b]
                ends = char_to_token_ends(tokenizer, rollout.response_ids[b, start:end].tolist()) if steps else []
                for end_char, v in steps:  # process reward: on the token holding the step's last char
                    step_values[b].append(source.weight * v)
                    step_positions[b].append(start + next((i for i, e in enumerate(ends) if e >= end_char),
                                                          end - start - 1))
        stats = source_stats(self.reward_sources, scored)
        if rollout.episodes is not None:  # each turn's environment reward on the turn's last token
            stats |= episode_stats(rollout.episodes)
            for b, episode in enumerate(rollout.episodes):
                step_values[b] += episode.rewards
                step_positions[b] += [end - 1 for _, end in episode.turns]
        scores += cfg.reward.no_stop_penalty * (~rollout.stopped.cpu()).float()
        if cfg.reward.overlong_buffer:  # DAPO's soft overlong punishment, by response length in tokens
            if rollout.episodes is not None:  # an episode: its longest turn (each turn's limit is max_new_tokens)
                lengths = [max(end - start for start, end in e.turns) for e in rollout.episodes]
            overlong = overlong_penalty(torch.tensor(lengths), cfg.rollout.max_new_tokens, cfg.reward.overlong_buffer)
            scores += cfg.reward.overlong_penalty * overlong
            stats["overlong_penalty"] = overlong.float()
        step_rewards = place_step_rewards(step_values, step_positions, (B, T), dtype=torch.float32)
        return Rewarded(scores.to(self.dev_policy), step_rewards.to(self.dev_policy), stats)

    def shares_prefix(self, model, grad: bool) -> bool:
        """Whether `model`'s forwards run each distinct prompt of a micro-batch once (logprobs.prefix_cache; a value
        head's policy inside its wrapper), so that micro-batches are sized for it (micro_cost)."""
        if model is None:
            return False
        with torch.set_grad_enabled(grad):
            return prefix_cache(getattr(getattr(model, "module", model), "policy", model)) is not None

    def logprobs_under(self, model, device, rollout: Rollout) -> torch.Tensor:
        """(B, T) log-probs of the rollout's responses under a model run without gradients (the reference;
        an async actor's policy: the behaviour log-probs), on the policy's device, in micro-batches."""
        out = torch.zeros(rollout.response_mask.shape, device=self.dev_policy)
        rows = torch.arange(out.shape[0], device=rollout.response_mask.device)
        for micro, counts in memory.same_count_everywhere(self.rt, model, micro_split(
                rollout, rows, self.memory.infer_tokens, self.shares_prefix(model, grad=False))):
            ids, attn, P, _ = micro.inputs(rollout)
            with torch.no_grad(), self.precision.autocast():
                logprobs = response_logprobs(model, ids.to(device), attn.to(device), P, self.cfg.rollout.temperature,
                                             chunk_elements=self.chunk, support=self.support).to(self.dev_policy)
            if counts:
                out[micro.rows.to(self.dev_policy), :micro.width] = logprobs
        return out

    def score_part(self, rollout: Rollout, prompts: list[str], rows: list[dict]
                   ) -> tuple[Rewarded, torch.Tensor, torch.Tensor]:
        """An actor's step 2: the rewards, the reference's log-probs and the behaviour log-probs (under the
        weights that sampled the batch) -> (Rewarded, (B, T), (B, T))."""
        return (self.reward_rows(rollout, prompts, rows), self.logprobs_under(self.reference, self.dev_ref, rollout),
                self.logprobs_under(self.policy, self.dev_policy, rollout))
