"""Per-token quantities from a forward pass: response log-probs (and entropies), critic values.

Shapes: B rows of left-padded prompts of width P followed by T response tokens
(input_ids (B, P + T)); everything returned is (B, T) over the response tokens.
Masks always come from lengths, never from ``ids != pad_id``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_cli.models import scalar_head
from rlhf_cli.training import distributed


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_values(model, input_ids, attention_mask) -> torch.Tensor:
    """Scalar head applied at every position: (B, L) float32. Critic values / RM scores."""
    if isinstance(model, TokenValues):  # through the module's forward: FSDP2 gathers its root's weights there
        return model(input_ids, attention_mask)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


def response_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True, chunk_elements: int | None = None,
                      support: "Support | None" = None):
    """log pi(token | prefix) of the response tokens, from logits / T.

    input_ids: (B, P + T) with left-padded prompts of width P. Returns (B, T)
    log-probs, and (B, T) entropies when asked (outside the autograd graph unless
    entropy_grad: an entropy only logged costs no backward over (B, T, V)).
    Never holds the (B, T, V) logits: see response_terms.
    """
    logprobs, entropy, _ = response_terms(model, input_ids, attention_mask, prompt_len, temperature, with_entropy,
                                          entropy_grad, chunk_elements, support)
    return (logprobs, entropy) if with_entropy else logprobs


@dataclass(frozen=True)
class Support:
    """The ids a response token can take, as the sampler draws them (rollout.sample): below
    vocab_limit (a padded vocabulary's extra rows have no token: Qwen2.5 has 151,936 rows for 151,665
    ids) and not in `never` (a dedicated pad token that is not a stop token). Log-probs, entropies
    and KL are over this support, so the update's pi is the distribution responses were drawn from."""
    vocab_limit: int | None = None
    never: tuple[int, ...] = ()


# a masked logit: exp() of it is 0 and 0 * it is 0 (with -inf, entropy's p log p would be nan)
MASKED = -1e30


def restrict(logits: torch.Tensor, support: Support | None) -> torch.Tensor:
    """(..., V) float logits -> (..., V') over the support: padded rows cut, `never` ids masked."""
    if support is None:
        return logits
    logits = logits[..., :support.vocab_limit]
    if support.never:
        logits = logits.index_fill(-1, torch.tensor(support.never, device=logits.device), MASKED)
    return logits


# rows of (V,) logits per chunk: 2**24 fp32 elements = 64 MiB, whatever the vocabulary
# (151,936 -> 110 rows; the embedded model's 264 -> 63k rows, i.e. one chunk)
CHUNK_ELEMENTS = 2 ** 24


def response_terms(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                   with_entropy: bool = False, entropy_grad: bool = True, chunk_elements: int | None = None,
                   support: "Support | None" = None):
    """-> ((B, T) log-probs, (B, T) entropies or None, (B, T, H) hidden states fed to the LM head
    before each response token), computed from the hidden states in chunks of rows.

    Memory: the model's forward runs with its LM head applied to ONE position (a pre-hook on the
    head keeps the (B, T + 1, H) hidden states and hands the head their first row); the head, any
    logit transform, log-softmax, gather and entropy then run over chunks of ~chunk_elements / V
    rows, each under activation checkpointing (non-reentrant: torch.utils.checkpoint), so the
    forward keeps only the hidden states and the backward recomputes one chunk's (rows, V) logits
    at a time. Peak extra memory is one chunk's logits and their gradient instead of (B, T, V)
    logits, their log-softmax and its gradient (what TRL's selective_log_softmax and verl's fused
    kernels avoid, by row loops and fused Triton kernels respectively). The numbers are the full
    computation's, row for row (tests/test_logprobs.py: values and gradients to 1e-6).

    Exactness check, free: the model's own logits for the first kept row ((B, 1, V), through every
    transform its forward applies, softcapping or scaling included) are compared with ours for that
    row; a model whose forward transforms logits in a way not reproduced here (see _head_logits)
    falls back, for that call, to the full (B, T, V) computation through its own forward.
    chunk_elements=0 asks for that full computation (policy.chunked_logprobs=false).
    support: the ids the sampler can draw (Support); the softmax is over those, as the sampler's is.
    """
    if chunk_elements == 0 or distributed.is_sharded(model):  # FSDP2: the root's head is resharded once its forward returns
        return _full_terms(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad,
                           support)
    response_len = input_ids.shape[1] - prompt_len
    found = shared_prefix_inputs(model, input_ids, attention_mask, prompt_len)
    if found is None:
        found = head_inputs(model, response_len + 1, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        if found is not None:  # (B, T + 1, H): the state before each response token, and the last
            found = found[0][:, :-1], found[1]
    if found is None:
        return _full_terms(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad,
                           support)
    before, transform = found
    B, T, H = before.shape
    logprobs, entropy = chunked_logprobs(transform, before.reshape(B * T, H), input_ids[:, prompt_len:].reshape(B * T),
                                         temperature, support, with_entropy, entropy_grad, chunk_elements)
    return logprobs.view(B, T), entropy.view(B, T) if with_entropy else None, before


def distinct_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
    """-> ((D, P) distinct prompt ids, (D, P) their masks, (B,) the distinct prompt of each row)."""
    both = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)], 1)
    distinct, copies = torch.unique(both, dim=0, return_inverse=True)
    return distinct[:, :prompt_len], distinct[:, prompt_len:], copies


def prefix_cache(model):
    """An empty DynamicCache for `model` when rows can share a prompt's keys and values through it, else None:
    every layer a plain key/value layer (not a sliding window, linear attention or state space), the model's
    forward takes a cache, the cache is kept (no gradient checkpointing under gradients), and the model is not
    FSDP-sharded. Under DDP the two forwards make one graph and one backward: each parameter's gradient is
    accumulated once, as for tied weights (tests/test_distributed.py: two ranks of B = one rank of 2B)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if distributed.is_sharded(model):
        return None
    inner = causal_lm(model)
    config = getattr(inner, "config", None)
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers 5.x; before: is_gradient_
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if config is None or _cache_keyword(inner) is None or (checkpointing and torch.is_grad_enabled()):
        return None
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config DynamicCache cannot read: the rows run whole
        return None
    return cache if all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])) else None


def _cache_keyword(inner) -> str | None:
    params = inspect.signature(inner.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)  # transformers 5.x renamed it


def shared_prefix_inputs(model, input_ids, attention_mask, prompt_len: int):
    """Rows that share a prompt (RL's K samples of one prompt) run it once -> ((B, T, H) hidden states the model
    feeds its LM head before each response token, hidden -> logits transform), or None: no prompt repeats, or a
    model this path does not cover (prefix_cache), or a head not reproduced (head_inputs); the caller then runs
    every row whole.

    Two forwards of the model's own code: the D distinct prompts (D < B) with a key/value cache, whose last
    position gives the state before each row's first response token; then the cache's rows copied to the B
    rows (an index: gradients from every copy sum into the prompt's keys and values) and the response tokens
    but the last run against it, with the row's whole attention mask and positions. The numbers are the
    whole-row forward's to float rounding, gradients included (tests/test_logprobs.py); the prompt's tokens go
    through the model D times instead of B (K = 4 samples of 46-token prompts with 3-token answers: 3.4x
    fewer tokens)."""
    distinct, distinct_mask, copies = distinct_prompts(input_ids, attention_mask, prompt_len)
    B, D, T = input_ids.shape[0], distinct.shape[0], input_ids.shape[1] - prompt_len
    if D == B or T < 1:
        return None
    cache = prefix_cache(model)
    if cache is None:
        return None
    cache_kw = {_cache_keyword(causal_lm(model)): cache}
    found = head_inputs(model, 1, cache=cache_kw, input_ids=distinct, attention_mask=distinct_mask,
                        position_ids=position_ids_from_mask(distinct_mask))
    if found is None or cache.get_seq_length() != prompt_len:
        return None
    first, transform = found  # (D, 1, H)
    before = first[copies]
    if T > 1:
        cache.batch_select_indices(copies)
        mask = attention_mask[:, :-1]
        found = head_inputs(model, T - 1, cache=cache_kw, input_ids=input_ids[:, prompt_len:-1], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)[:, prompt_len:])
        if found is None:
            return None
        before = torch.cat([before, found[0]], 1)
    return before, transform


def head_inputs(model, keep: int | None = None, cache: dict | None = None, **inputs):
    """The model's forward with its LM head applied to ONE position -> ((B, keep, H) hidden states the model
    feeds its head (every position when keep is None), hidden -> logits transform) or None when the model's own
    logits differ from the transform's (a head not reproduced here: the caller takes the full path).

    A pre-hook on the head keeps the hidden states and hands the head their first row; the model's own logits
    for that row ((B, 1, V), through every transform its forward applies, softcapping or scaling included) are
    compared with the transform's: the exactness check, free. cache: {keyword: a DynamicCache} the forward fills
    (shared_prefix_inputs), else none kept."""
    inner = causal_lm(model)
    head = inner.get_output_embeddings()
    fed = []

    def one_row_to_head(module, args):  # keep the hidden states, let the model's head compute one row
        fed.append(args[0])
        return (args[0][:, :1],) + tuple(args[1:])

    hook = head.register_forward_pre_hook(one_row_to_head)
    try:
        model_logits = model(**inputs, use_cache=cache is not None, **(cache or {}),
                             **(_keep_last_logits(model, keep) if keep else {})).logits  # (B, 1, V)
    finally:
        hook.remove()
    hidden = fed[0] if keep is None else fed[0][:, -keep:]
    transform = _head_logits(inner, head)
    with torch.no_grad():
        first = transform(fed[0][:, :1]).float()  # the row the model's own head computed
    own = model_logits[:, :1].detach().float()
    if not torch.allclose(first, own, rtol=1e-3, atol=1e-3 * (1.0 + own.abs().max().item())):
        return None
    return hidden, transform


def chunked_logprobs(transform, flat_h: torch.Tensor, flat_t: torch.Tensor, temperature: float = 1.0,
                     support: "Support | None" = None, with_entropy: bool = False, entropy_grad: bool = True,
                     chunk_elements: int | None = None):
    """(N, H) hidden states and (N,) target ids -> ((N,) log pi(target), (N,) entropies or None), over chunks of
    ~chunk_elements / V rows, each under activation checkpointing when gradients flow: the forward keeps only
    the hidden states, the backward recomputes one chunk's (rows, V) logits at a time (response_terms)."""
    N = flat_h.shape[0]
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, transform.vocab))
    want_entropy_grad = with_entropy and entropy_grad and torch.is_grad_enabled()

    def chunk(h, t):
        logp_all = F.log_softmax(restrict(transform(h).float(), support) / temperature, dim=-1)  # (rows, V)
        logp = logp_all.gather(-1, t[:, None]).squeeze(-1)
        if not with_entropy:
            return logp, None
        with torch.set_grad_enabled(want_entropy_grad):
            return logp, -(logp_all.exp() * logp_all).sum(-1)

    logps, ents = [], []
    recompute = torch.is_grad_enabled() and flat_h.requires_grad and N > rows  # one chunk: nothing to save
    for i in range(0, N, rows):
        h, t = flat_h[i:i + rows], flat_t[i:i + rows]
        if recompute:
            logp, ent = torch.utils.checkpoint.checkpoint(chunk, h, t, use_reentrant=False)
        else:
            logp, ent = chunk(h, t)
        logps.append(logp)
        ents.append(ent)
    logprobs = torch.cat(logps) if logps else flat_h.new_zeros(N, dtype=torch.float32)
    entropy = (torch.cat(ents) if logps else torch.zeros_like(logprobs)) if with_entropy else None
    return logprobs, entropy


def completion_logprobs(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | prefix) of every completion token of a right-padded or packed batch (`data.padded_batch`,
    `data.packed_batch`: input_ids, labels with -100 off the completion, attention_mask, position_ids) ->
    ((N,) float32 in row-major order, (R, L-1) bool: where each sits, as targets of positions 0..L-2).

    Only completion positions go through the LM head, in chunks (gathered_logprobs): no (R, L, V) logits are held
    and prompt positions cost no head at all. sft's loss is minus their sum."""
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch.pop("labels")[:, 1:]  # (R, L-1)
    scored = targets != -100
    R, L = batch["input_ids"].shape
    rows, cols = scored.nonzero(as_tuple=True)  # row-major
    return gathered_logprobs(model, batch, rows * L + cols, targets[scored]), scored


def gathered_logprobs(model, inputs: dict, at: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target | the state at a position) for N (position, target) pairs of one forward: inputs (input_ids
    (R, L), attention_mask (R, L) or a (R, 1, L, L) mask, position_ids), at (N,) flat positions r * L + t,
    targets (N,) ids -> (N,) float32. Only those N states go through the LM head, in chunks (chunked_logprobs); a
    head not reproduced there (and FSDP2's root) takes the model's own full (R, L, V) logits."""
    found = None if distributed.is_sharded(model) else head_inputs(model, None, **inputs)
    if found is None:
        logits = model(**inputs, use_cache=False).logits.float()  # (R, L, V)
        return -F.cross_entropy(logits.flatten(0, 1)[at], targets, reduction="none")
    hidden, transform = found  # (R, L, H)
    logprobs, _ = chunked_logprobs(transform, hidden.flatten(0, 1)[at], targets)
    return logprobs


def _head_logits(inner, head):
    """hidden (N, H) -> the logits the model's forward returns for them: its LM head, then the
    transforms transformers' causal LMs apply after it (Gemma 2/3 final softcapping, Cohere's
    logit scale). Anything else is caught by response_terms' comparison."""
    cap = getattr(inner.config, "final_logit_softcapping", None)
    scale = getattr(inner, "logit_scale", None)

    def transform(h):
        logits = head(h)
        if scale is not None:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    transform.vocab = head.weight.shape[0]  # V: the chunk size in rows is chunk_elements / V
    return transform


def _full_terms(model, input_ids, attention_mask, prompt_len, temperature, with_entropy, entropy_grad, support=None):
    """response_terms through the model's own forward, (B, T, V) logits and all: the fallback for
    heads not reproduced here and for FSDP2 (whose root reshards the head when its forward returns)."""
    response_len = input_ids.shape[1] - prompt_len
    fed = []
    hook = causal_lm(model).get_output_embeddings().register_forward_pre_hook(
        lambda module, args: fed.append(args[0]))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                       **_keep_last_logits(model, response_len + 1)).logits
    finally:
        hook.remove()
    before = fed[0][:, -(response_len + 1):-1]  # (B, T, H)
    logits = restrict(logits[:, -(response_len + 1):-1].float(), support) / temperature  # (B, T, V)
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    if not with_entropy:
        return logprobs, None, before
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy, before


def causal_lm(model):
    """The transformers causal LM inside DDP / FSDP / peft / lora.AdaptersOff wrappers."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers pass keywords through
    if not hasattr(inner, "forward"):  # lora.AdaptersOff: the policy's own module, run with adapters off
        inner = inner.model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _keep_last_logits(model, n: int) -> dict:
    """{"logits_to_keep": n} when the model's forward takes it (transformers causal LMs do), else {}."""
    inner = causal_lm(model)
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


class PolicyWithValueHead(torch.nn.Module):
    """critic.init=shared: a value head on the policy's last hidden state (the actor-critic of Mnih et
    al. 2016 and of TRL's former AutoModelForCausalLMWithValueHead): one forward and one backward
    give log-probs and values, where a separate critic costs a second model's forward and backward.

    The log-probs come from response_terms (chunked over the vocabulary-sized logits); the values
    from the hidden states the model's forward feeds its LM head. The head starts at zero, so
    the first values are 0 as with a fresh critic head."""

    def __init__(self, policy, chunk_elements: int | None = None, support: Support | None = None):
        super().__init__()
        self.policy = policy
        self.chunk_elements = chunk_elements
        self.support = support
        weight = self._lm_head().weight  # (V, H)
        self.v_head = torch.nn.Linear(weight.shape[1], 1, device=weight.device, dtype=weight.dtype)
        torch.nn.init.zeros_(self.v_head.weight)
        torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0, with_entropy: bool = True,
                entropy_grad: bool = True):
        """-> (B, T) log-probs, (B, T) entropies (None unless with_entropy), (B, T) values V(s_t) of the
        states before each response token."""
        chunk = 0 if distributed.is_sharded(self) else self.chunk_elements  # FSDP2 root: the full path, as for a policy
        logprobs, entropy, before_response = response_terms(self.policy, input_ids, attention_mask, prompt_len,
                                                            temperature, with_entropy, entropy_grad, chunk,
                                                            self.support)
        return logprobs, entropy, self.v_head(before_response).squeeze(-1).float()

    def _lm_head(self) -> torch.nn.Module:
        inner = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        return inner.get_output_embeddings()


class TokenValues(torch.nn.Module):
    """token_values as a module, so a DDP / FSDP2 wrapper's forward (and gradient sync) runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return token_values(self.model, input_ids, attention_mask)  # (B, L)
