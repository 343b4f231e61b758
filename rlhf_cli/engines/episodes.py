"""Multi-turn episodes on any rollout engine: every live episode of a batch advances one turn per generate call.

    rollout = run_episodes(engine, tokenizer, EnvClass, rows, prompt_ids, params, max_turns=4,
                           max_sequence=512, timeout_s=10.0)

Token in, token out: an episode's context is its prompt ids, then each turn's sampled ids exactly as the engine
drew them (stop token included), then the ids of the environment's messages as the chat template renders them
after an assistant turn (`turn_ids`); the next turn is generated from that context. Nothing is re-tokenised
from decoded text, so the ids trained are the ids sampled and the sampler's log-probs are the policy's at every
turn (tests/test_envs.py checks them against a forward of the whole episode).

The result is one `Rollout` whose response region holds the whole episode after the prompt: assistant tokens
have response_mask 1 (trained: the loss, KL and entropy see them), environment tokens 0; `context_mask` is 1 on
every real token of the region (attention, positions, lengths). `episodes` keeps, per row, each assistant turn's
span, text and reward, the conversation, and why the episode ended:

    done          the environment said so            max_turns   env.max_turns turns taken
    no_stop       a turn hit rollout.max_new_tokens   context     the next turn would not fit in the sequence
    env_error     a step raised, hung or returned the wrong types (the reason is kept; the turn's reward 0)

Noise: turn 0 draws exactly what a single-turn rollout of the same rows draws (params.noise_key); turn k > 0
draws with the seed offset by k over the episodes still live, in row order: deterministic, so a resumed run
samples what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from rlhf_cli.data import apply_template, encode, left_pad
from rlhf_cli.engines.rollout import Rollout
from rlhf_cli.envs import EnvFailure, as_step, call, opening

TURN_NOISE = 7919  # turn k draws with seed + k * TURN_NOISE
BASE_CHAT = ({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"})


@dataclass
class Episode:
    """One row's episode: its assistant turns (spans in the response region, texts, rewards) and its ending."""
    turns: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each assistant turn's tokens
    texts: list[str] = field(default_factory=list)  # each assistant turn decoded (stop token left out)
    rewards: list[float] = field(default_factory=list)  # the environment's reward of each assistant turn
    messages: list[dict] = field(default_factory=list)  # the conversation after the opening: assistant + env turns
    solved: bool | None = None  # the environment's verdict when it ended the episode
    end: str = ""  # done / max_turns / no_stop / context / env_error: <reason>

    def summary(self) -> dict:
        """The episode as JSON rows show it (rlhf eval / rlhf generate)."""
        return {"turns": len(self.turns), "turn_rewards": self.rewards, "solved": self.solved, "end": self.end,
                "messages": self.messages}


def episode_stats(episodes: list[Episode]) -> dict[str, torch.Tensor]:
    """Per-row values of the logged episode means: the environment's return, turns, solved, env errors."""
    def column(values) -> torch.Tensor:
        return torch.tensor([float(v) for v in values])

    return {"env_return": column(sum(e.rewards) for e in episodes), "turns": column(len(e.turns) for e in episodes),
            "solved": column(e.solved is True for e in episodes),
            "env_errors": column(e.end.startswith("env_error") for e in episodes)}


@functools.lru_cache(maxsize=8)
def _base(tokenizer) -> tuple[list[int], int]:
    """The ids of BASE_CHAT rendered, and where its assistant turn's end-of-turn token ends (the cut after
    which an appended turn's ids begin): the last id of the rendering that the model stops on."""
    ids = encode(tokenizer, apply_template(tokenizer, list(BASE_CHAT), add_generation_prompt=False))
    stops = {tokenizer.eos_token_id, *[i for i in tokenizer.convert_tokens_to_ids(
        [t for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>") if t in tokenizer.get_vocab()])]}
    cut = max((i + 1 for i, t in enumerate(ids) if t in stops), default=len(ids))
    return ids, cut


def turn_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids that follow an assistant turn's end-of-turn token when `messages` come next and the assistant
    answers: the chat template's own rendering (separators, roles, the generation prompt), cut where a fixed
    conversation's assistant turn ends. Without a chat template: the contents one line each, then a newline."""
    if not getattr(tokenizer, "chat_template", None):
        return encode(tokenizer, "\n" + "".join(m["content"] + "\n" for m in messages))
    base, cut = _base(tokenizer)
    full = encode(tokenizer, apply_template(tokenizer, list(BASE_CHAT) + messages, add_generation_prompt=True))
    if full[:cut] != base[:cut]:  # a template that rewrites earlier turns: the appended text alone
        prefix = apply_template(tokenizer, list(BASE_CHAT), add_generation_prompt=False)
        text = apply_template(tokenizer, list(BASE_CHAT) + messages, add_generation_prompt=True)
        return encode(tokenizer, text[len(prefix):] if text.startswith(prefix) else text)
    return full[cut:]


@dataclass
class _Live:
    """An episode being played: its environment, its context ids and the response region built so far."""
    env: object | None
    context: list[int]
    ids: list[int] = field(default_factory=list)
    trained: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    episode: Episode = field(default_factory=Episode)


def run_episodes(engine, tokenizer, env_cls, rows: list[dict], prompt_ids: list[list[int]], params, max_turns: int,
                 max_sequence: int, timeout_s: float, device=None):
    """Episodes of `rows` (prompt_ids: each row's rendered opening, cut to fit) -> a Rollout with context_mask
    and episodes (module docstring)."""
    games = [_start(env_cls, row, ids, timeout_s) for row, ids in zip(rows, prompt_ids)]
    live = list(range(len(games)))  # the episodes still going, in row order
    for turn in range(max_turns):
        if not live:
            break
        ids, mask = left_pad([games[b].context for b in live], tokenizer.pad_token_id)
        key = params.noise_key
        turn_params = params if key is None else dataclasses.replace(
            params, noise_key=(key[0] + turn * TURN_NOISE, key[1], key[2]))
        out = engine.generate(ids.to(device), mask.to(device), turn_params)
        # to the host once a turn (the environments read text): ids, log-probs, lengths and stop flags as lists
        lengths, sampled, logprobs, stopped = (x.tolist() for x in (out.response_mask.sum(-1).long(), out.response_ids,
                                                                    out.logprobs, out.stopped))
        going = []
        for i, b in enumerate(live):
            if _play_turn(games[b], tokenizer, sampled[i][:lengths[i]], logprobs[i][:lengths[i]], stopped[i],
                          turn + 1 == max_turns, max_sequence - params.max_new_tokens, timeout_s):
                going.append(b)
        live = going
    prompt, prompt_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    width = max(len(g.ids) for g in games)

    def right(values, fill, dtype):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype)

    response = right([g.ids for g in games], tokenizer.pad_token_id, torch.long)
    context_mask = right([[1.0] * len(g.ids) for g in games], 0.0, torch.float32)
    stopped = torch.tensor([g.episode.end != "no_stop" for g in games])
    return Rollout(prompt.to(device), prompt_mask.to(device), response.to(device),
                   right([g.trained for g in games], 0.0, torch.float32).to(device),
                   right([g.logprobs for g in games], 0.0, torch.float32).to(device), stopped.to(device),
                   context_mask=context_mask.to(device), episodes=[g.episode for g in games])


def _start(env_cls, row: dict, prompt_ids: list[int], timeout_s: float) -> _Live:
    """A new episode: a fresh environment reset on the row (the prompt ids were rendered from its opening at
    setup); a failing reset leaves the episode to end after its first turn."""
    game = _Live(None, list(prompt_ids))
    try:
        game.env = opening(env_cls, row, timeout_s)[0]
    except EnvFailure as e:
        game.episode.end = f"env_error: {e}"
    return game


def _play_turn(game: _Live, tokenizer, sampled: list[int], logprobs: list[float], stopped: bool, last: bool,
               room: int, timeout_s: float) -> bool:
    """One assistant turn into the episode, then the environment's step -> whether the episode goes on."""
    episode = game.episode
    start = len(game.ids)
    game.ids += sampled
    game.trained += [1.0] * len(sampled)
    game.logprobs += logprobs
    game.context += sampled
    text = tokenizer.decode(sampled[:-1] if stopped else sampled, skip_special_tokens=True)
    episode.turns.append((start, len(game.ids)))
    episode.texts.append(text)
    episode.messages.append({"role": "assistant", "content": text})
    episode.rewards.append(0.0)
    if episode.end:  # its reset failed
        return False
    if not stopped:
        episode.end = "no_stop"
        return False
    try:
        step = as_step(call(game.env.step, (text,), timeout_s, "step"))
    except EnvFailure as e:
        episode.end = f"env_error: {e}"
        return False
    episode.rewards[-1] = float(step.reward)
    episode.messages += step.messages
    if step.done or last:
        episode.end, episode.solved = ("done" if step.done else "max_turns"), step.solved
        return False
    appended = turn_ids(tokenizer, step.messages)
    if len(game.context) + len(appended) > room:
        episode.end = "context"
        return False
    game.ids += appended
    game.trained += [0.0] * len(appended)
    game.logprobs += [0.0] * len(appended)
    game.context += appended
    return True
