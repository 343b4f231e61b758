"""Rollout engines: step 1 of the RL recipe asks an engine for responses and knows nothing else about it.

    engine = make_engine(cfg.rollout.engine, policy, tokenizer)      # auto / lean / hf
    engine.sync_weights(policy)                                      # before a rollout whose weights must be current
    rollout = engine.generate(prompt_ids, prompt_mask, SamplingParams(max_new_tokens=40, noise_key=(seed, step, row0)))

A `Rollout` holds the tokens, masks, stop flags and the engine's own (behaviour)
log-probs; the log-probs the update uses come from the training model (stages/rl.py,
step 2), so an engine whose numerics differ from training only shows up as a gap
between the two, never as a wrong gradient.

Today's engine, `LocalEngine`, decodes with the training model itself (no weight
copy; `sync_weights` has nothing to do) through one of decoding.py's decoders:
`lean` (Llama family, preallocated KV cache), `hf` (the model's own forward), or
`auto` (lean where it applies). Token t of row r is drawn by inverse CDF from
uniform noise keyed by (seed, step, global row), so what a row samples depends on
neither the batch around it nor the number of ranks, and a resumed run samples
what the uninterrupted one did. Under FSDP2 the caller holds the policy's weights
gathered around `generate` (distributed.gathered: collective, every rank).

`vllm` (vllm_engine.py, registered by name so that vLLM is imported only when chosen):
vLLM colocated with the policy, holding its own copy of the weights; `sync_weights`
pushes the policy's (LoRA merged; FSDP2 shards gathered), `generate` seeds each request
from `noise_key` and returns vLLM's log-probs as behaviour log-probs.

Adding an engine, without touching the recipe: a class with the same two methods (and
`vocab_limit`, `never`, `separate_weights`), registered in ENGINES under its
`rollout.engine` name.
- Remote rollout workers (another process or node generating while the learner
  trains): an engine whose `generate` receives rollouts from the workers and whose
  `sync_weights` streams the weights to them (torch.distributed broadcast); a
  Rollout made with older weights carries them in its behaviour log-probs, which
  the loss can correct for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from rlhf_cli.engines.decoding import make_decoder
from rlhf_cli.errors import UserError
from rlhf_cli.models import stop_token_ids
from rlhf_cli.training import runtime


@dataclass
class Rollout:
    """Sampled responses. prompt_ids (B, P) left-padded; response_ids (B, T)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 up to and including the first stop token
    logprobs: torch.Tensor  # (B, T) under logits / T at sampling time
    stopped: torch.Tensor  # (B,) bool: emitted the stop token
    # multi-turn episodes (episodes.py): the response region holds assistant and environment tokens; response_mask
    # is 1 on the assistant's (trained), context_mask on every real token (attention, positions, lengths)
    context_mask: torch.Tensor | None = None  # (B, T); None: the response mask (one turn: every token is trained)
    episodes: list | None = None  # per row, episodes.Episode: turn spans, texts, rewards, how it ended

    @property
    def real_mask(self) -> torch.Tensor:
        """(B, T) 1 on every real token of the response region, a prefix of each row (padding after)."""
        return self.response_mask if self.context_mask is None else self.context_mask

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.real_mask.long()], 1)


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The rollout's rows `rows` (a slice, or a (N,) index or bool tensor), every field alike."""
    episodes = None
    if rollout.episodes is not None:
        index = range(len(rollout.episodes))[rows] if isinstance(rows, slice) else torch.arange(
            len(rollout.episodes))[rows.cpu()].tolist()
        episodes = [rollout.episodes[i] for i in index]
    return Rollout(*(getattr(rollout, f)[rows] for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask",
                                                         "logprobs", "stopped")),
                   context_mask=rollout.context_mask[rows] if rollout.context_mask is not None else None,
                   episodes=episodes)


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different widths stacked row-wise: prompts padded on the left to the widest P, responses on the
    right to the widest T (ids with pad_id, masks, log-probs with 0). Masks come from the parts' own masks, so
    padding never becomes a real token, and position ids (from the attention mask) stay those of each row."""
    width_p = max(r.prompt_ids.shape[1] for r in rollouts)
    width_t = max(r.response_ids.shape[1] for r in rollouts)

    def filler(x: torch.Tensor, width: int, value) -> torch.Tensor:  # any dtype, bool masks included
        return torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)

    def left(x: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([filler(x, width_p, value), x], 1)

    def right(x: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([x, filler(x, width_t, value)], 1)

    episodic = rollouts[0].episodes is not None
    return Rollout(torch.cat([left(r.prompt_ids, pad_id) for r in rollouts]),
                   torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
                   torch.cat([right(r.response_ids, pad_id) for r in rollouts]),
                   torch.cat([right(r.response_mask, 0) for r in rollouts]),
                   torch.cat([right(r.logprobs, 0.0) for r in rollouts]),
                   torch.cat([r.stopped for r in rollouts]),
                   context_mask=torch.cat([right(r.real_mask, 0) for r in rollouts]) if episodic else None,
                   episodes=[e for r in rollouts for e in r.episodes] if episodic else None)


@dataclass
class SamplingParams:
    """How to sample one rollout batch."""
    max_new_tokens: int
    temperature: float = 1.0  # log-probs everywhere are of softmax(logits / T)
    top_k: int | None = None  # biases the KL estimate (log-probs are of the unfiltered policy)
    top_p: float | None = None
    greedy: bool = False  # held-out evaluation
    noise_key: tuple[int, int, int] | None = None  # (seed, step, global index of the batch's first row)


class RolloutEngine(Protocol):
    """What the RL recipe and held-out evaluation ask of an engine (see the module docstring)."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams) -> Rollout:
        """Left-padded prompts (B, P) on the engine's device -> B responses (a prompt repeated K times: K rows)."""

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from `policy`'s current weights."""


class LocalEngine:
    """Decodes with the training model itself, through decoding.py's `lean` or `hf` decoder (`auto`:
    lean where it applies). Runs the model in eval mode (dropout off) and restores each module's mode after.

    stop_ids: every id that ends a response (models.stop_token_ids: the tokenizer's EOS and the
    model's generation config's); vocab_limit: the tokenizer's size, where the model's vocabulary
    is padded beyond it (Qwen: 151,936 rows for 151,665 ids), so no id without a token is sampled;
    nor is a dedicated pad token (Gemma's <pad>)."""

    separate_weights = False  # samples with the training model itself: behaviour log-probs are the policy's

    def __init__(self, model: torch.nn.Module, stop_ids: list[int], pad_id: int, decoder: str = "auto",
                 vocab_limit: int | None = None, memory=None):
        self.model, self.stop_ids, self.pad_id, self.decoder = model, stop_ids, pad_id, decoder
        self.vocab_limit = vocab_limit
        self.memory = memory  # memory.MemoryPlan: rows per decode call (KV cache + sampling buffers); None: all rows
        self.never = [pad_id] if pad_id is not None and pad_id not in stop_ids else None  # Gemma's <pad>

    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Nothing to copy: the engine holds the training model itself."""

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams) -> Rollout:
        """In decode calls of at most memory.generate_rows rows (the KV cache within the stage's memory plan);
        each row's draw depends on its own noise only, so the split gives the rows the unsplit call gives."""
        B = prompt_ids.shape[0]
        rows = (self.memory.generate_rows(prompt_ids.shape[1] + params.max_new_tokens) if self.memory else None) or B
        noise = None
        if params.noise_key is not None:  # (B, max_new_tokens): row g of the global batch draws with its own noise
            seed, step, first_row = params.noise_key
            noise = runtime.keyed_uniform(seed, step, first_row, B, params.max_new_tokens, prompt_ids.device)
        modes = [(m, m.training) for m in self.model.modules()]  # restored module by module (models.dropout_off)
        self.model.eval()
        try:
            parts = [sample(self.model, prompt_ids[i:i + rows], prompt_mask[i:i + rows], params.max_new_tokens,
                            self.stop_ids, self.pad_id, params.temperature, greedy=params.greedy, top_k=params.top_k,
                            top_p=params.top_p, noise=noise[i:i + rows] if noise is not None else None,
                            engine=self.decoder, vocab_limit=self.vocab_limit, never=self.never)
                     for i in range(0, B, rows)]
        finally:
            for module, mode in modes:
                module.training = mode
        return parts[0] if len(parts) == 1 else concat_rollouts(parts, self.pad_id)


# rollout.engine -> engine class, or "module:Class" imported only when that engine is built (vLLM). Any other
# "module:Class" the config names is an engine of the user's (one file: a class with the RolloutEngine members,
# made as Engine(model, stop_ids, pad_id, decoder=<the name>, vocab_limit=..., options=... when given)).
ENGINES = {"auto": LocalEngine, "lean": LocalEngine, "hf": LocalEngine, "vllm": "rlhf_cli.engines.vllm_engine:VLLMEngine"}


def engine_module(name: str, engine_key: str = "rollout.engine"):
    """The module of an engine given as "module:Class" (vLLM's, imported only when chosen; a user's, by the
    dotted path the config names), else None. A module that cannot be imported is one error line."""
    entry = ENGINES.get(name, name)
    if not isinstance(entry, str):
        return None
    module_name = entry.split(":")[0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{engine_key}={name}: cannot import module {module_name!r} ({e}); check the name and that "
                        f"it is on PYTHONPATH") from None


def engine_class(name: str, engine_key: str = "rollout.engine"):
    """The class an engine name stands for (a "module:Class" entry imported here)."""
    entry = ENGINES.get(name, name)
    if not isinstance(entry, str):
        return entry
    cls = getattr(engine_module(name, engine_key), entry.split(":")[1], None)
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("generate", "sync_weights")):
        raise UserError(f"{engine_key}={name} is not an engine class: name a class with generate(prompt_ids, "
                        f"prompt_mask, params) and sync_weights(policy) (docs/engines.md)")
    return cls


def check_engine(name: str, model_path: str, key: str, engine_key: str = "rollout.engine") -> None:
    """An engine's own checks of the model at `model_path` (config only, before any weights load): vLLM's
    architectures and head sizes; a user's engine class, its `check_model(model_path, key, engine_key)` if it
    has one. The local engines check nothing here."""
    module = engine_module(name, engine_key)
    if module is not None:
        check = getattr(engine_class(name, engine_key), "check_model", None) or getattr(module, "check_model", None)
        if check is not None:
            check(model_path, key, engine_key)


def make_engine(name: str, model: torch.nn.Module, tokenizer, options: dict | None = None,
                memory=None) -> RolloutEngine:
    """The engine `rollout.engine` names, sampling from `model` (the unwrapped policy): it stops on any of
    the model's stop ids and never samples an id beyond the tokenizer. options: the engine's own settings
    (vllm: rollout.vllm and the sequence length; the local engines take none). memory: the stage's
    memory.MemoryPlan, which bounds the rows of one decode call of the local engines (vLLM manages its own)."""
    cls = engine_class(name)
    extra = {"options": options} if options else {}
    if memory is not None and issubclass(cls, LocalEngine):
        extra["memory"] = memory
    return cls(model, stop_token_ids(tokenizer, model), tokenizer.pad_token_id,
               decoder=name if name in ENGINES else "auto", vocab_limit=len(tokenizer), **extra)


def response_mask_from_tokens(tokens: torch.Tensor, eos_id) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on tokens up to and including the first stop token (eos_id: an id or a list of ids);
    (mask (B,T) float, stopped (B,) bool)."""
    is_eos = torch.isin(tokens, _stop_tensor(eos_id, tokens.device)).long()
    before_or_at_first = (is_eos.cumsum(-1) - is_eos) == 0
    return before_or_at_first.float(), is_eos.any(-1)


def _stop_tensor(eos_id, device) -> torch.Tensor:
    if isinstance(eos_id, torch.Tensor):
        return eos_id.to(device)
    return torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id, pad_id: int,
           temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
           top_k: int | None = None, top_p: float | None = None, noise: torch.Tensor | None = None,
           engine: str = "auto", vocab_limit: int | None = None, never: list[int] | None = None) -> Rollout:
    """Batched sampling with a KV cache (decoding.py's engines); a row leaves the batch once it has
    emitted a stop token (eos_id: an id, or a list of ids), and sampling ends when every row has.
    With vocab_limit, ids at or beyond it (rows of a padded vocabulary: no token) are never drawn, nor
    the ids in `never` (a pad token that is not a stop token: padding never sits inside a response).

    Log-probs are of the unfiltered distribution softmax(logits / T) over the ids that can be drawn
    (padded vocabulary rows and `never` excluded), the one training uses (logprobs.Support; top-k /
    top-p bias the KL estimate; the RL stage logs that).
    With `noise` ((B, max_new_tokens) uniforms in [0, 1), e.g. runtime.keyed_uniform)
    token t of row b is drawn by inverse CDF from noise[b, t]: a row's draw depends on
    its own noise only, not on the batch around it (so not on the number of ranks).
    """
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    stop = _stop_tensor(eos_id, device)
    decoder = make_decoder(model, engine, prompt_ids.shape[1] + max_new_tokens)
    # each distinct prompt is prefilled once (rl samples K responses per prompt), then its cache is copied
    distinct, copies = (torch.unique(torch.cat([prompt_ids, prompt_mask.long()], 1), dim=0, return_inverse=True)
                        if decoder.can_keep else (prompt_ids, None))
    if distinct.shape[0] < batch:
        P = prompt_ids.shape[1]
        logits = decoder.prefill(distinct[:, :P], distinct[:, P:], max_new_tokens)[copies]
        decoder.keep(copies)
    else:
        logits = decoder.prefill(prompt_ids, prompt_mask, max_new_tokens)
    response = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    rows = torch.arange(batch, device=device)  # the original row of each row still decoding
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        logits = logits[:, :vocab_limit].float() / temperature  # (rows, V); the rows past the tokenizer: cut
        if never is not None:
            logits[:, never] = float("-inf")
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = F.softmax(_top_k_top_p(logits, top_k, top_p), -1)
            if noise is not None:  # inverse CDF, float64 so the cumulative sum stays exact enough
                cdf = probs.double().cumsum(-1)
                u = noise[rows, t, None].to(cdf) * cdf[:, -1:]
                token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
            else:
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        token = torch.where(done, pad_id, token)  # a stopped row not yet dropped writes padding
        response[rows, t] = token
        token_logprob = F.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        logprobs[rows, t] = torch.where(done, 0.0, token_logprob)  # a stopped row's padding: -inf when pad is `never`
        steps = t + 1
        done = done | torch.isin(token, stop)
        going = ~done
        n_going = int(going.sum())  # one host sync per token: stop, or drop the rows that stopped
        if n_going == 0 or t + 1 == max_new_tokens:
            break
        if decoder.can_keep and n_going <= rows.shape[0] * 7 // 8:  # a cache copy costs about a step: in eighths
            keep = going.nonzero().squeeze(-1)
            decoder.keep(keep)
            rows, token, done = rows[keep], token[keep], done[keep]
        logits = decoder.step(token)
    response = response[:, :steps]
    response_mask, stopped = response_mask_from_tokens(response, stop)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_id))
    return Rollout(prompt_ids, prompt_mask.long(), response, response_mask, logprobs[:, :steps] * response_mask,
                   stopped)


def _top_k_top_p(logits, top_k, top_p):
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = F.softmax(sorted_logits, -1).cumsum(-1)
        remove = cum - F.softmax(sorted_logits, -1) > top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Each row's response text (the stop token left out); an episode's: its last assistant turn."""
    if rollout.episodes is not None:
        return [e.texts[-1] for e in rollout.episodes]
    lengths = rollout.response_mask.sum(-1).long().tolist()
    texts = []
    for ids, n, stopped in zip(rollout.response_ids.tolist(), lengths, rollout.stopped.tolist()):
        ids = ids[: n - 1] if stopped else ids[:n]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts
