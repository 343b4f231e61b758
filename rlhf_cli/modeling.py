"""Models through the real Hugging Face path: loading with one-line errors,
response log-probs, scores read at the last real token, and KV-cache sampling.

Masks always come from lengths, never from ``ids != pad_id`` (pad and stop
tokens may coincide in a tokenizer).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf_cli import lora
from rlhf_cli.errors import UserError
from rlhf_cli.runtime import DTYPES


def _check_model_dir(path: str, key: str) -> None:
    p = Path(path).expanduser()
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"{key}: {path} does not exist; point it at a model directory (e.g. runs/sft/final)")
    if p.exists() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise UserError(f"{key}: {path} is not a Hugging Face model directory (no config.json, nor a LoRA "
                        f"adapter's adapter_config.json)")


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_model_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: could not load a tokenizer from {path}: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # allowed: masks come from lengths
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer at {path} has no EOS token; responses could never stop")
    tok.padding_side = "left"
    return tok


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_causal_lm(path: str, key: str, dtype: str = "fp32", device=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    _check_model_dir(path, key)
    quiet_transformers()
    if lora.is_adapter_dir(path):  # a LoRA final/: its base with the adapter merged in
        model = lora.load_merged(path, key, lambda base: load_causal_lm(base, key, dtype, None, trust_remote_code))
        return model.to(device) if device is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: {path} does not load as a causal LM: {str(e).splitlines()[0][:200]}") from None
    return model.to(device) if device is not None else model


def load_scalar_head_model(path: str, key: str, dtype: str = "fp32", device=None, trust_remote_code: bool = False):
    """A sequence classifier with one output (reward model or critic). From a causal LM
    checkpoint the head is new (zero-initialised so a fresh head scores 0)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _check_model_dir(path, key)
    quiet_transformers()
    if lora.is_adapter_dir(path):  # a LoRA final/ (reward model or policy): base + adapter merged
        model = lora.load_merged(path, key, lambda base: load_scalar_head_model(base, key, dtype, None, trust_remote_code))
        return model.to(device) if device is not None else model
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        fresh_head = getattr(config, "num_labels", None) != 1 or not any(
            a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: {path} does not load as a causal LM or sequence classifier: "
                        f"{str(e).splitlines()[0][:200]}") from None
    if fresh_head:
        with torch.no_grad():
            scalar_head(model).weight.zero_()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.to(device) if device is not None else model


def scalar_head(model) -> torch.nn.Linear:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        # a LoRA reward model's head is peft's ModulesToSaveWrapper around the Linear (a trainable copy)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
    raise UserError(f"{type(model).__name__} has no linear score head this tool knows (score / classifier)")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_values(model, input_ids, attention_mask) -> torch.Tensor:
    """Scalar head applied at every position: (B, L) float32. Critic values / RM scores."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


def last_token_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Reward-model score read at the last real token of each row, any padding side: (B,)."""
    values = token_values(model, input_ids, attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)  # rightmost real token
    return values.gather(1, last[:, None]).squeeze(1)


def response_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                      with_entropy: bool = False, entropy_grad: bool = True):
    """log pi(token | prefix) of the response tokens, from logits / T.

    input_ids: (B, P + T) with left-padded prompts of width P. Returns (B, T)
    log-probs, and (B, T) entropies when asked (outside the autograd graph unless
    entropy_grad: an entropy only logged costs no backward over (B, T, V)).
    """
    response_len = input_ids.shape[1] - prompt_len
    # the LM head only on the T + 1 last positions, not on the prompt's (cost: B x (P + T) x V matmul otherwise)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **_keep_last_logits(model, response_len + 1)).logits
    logits = logits[:, -(response_len + 1):-1].float() / temperature  # (B, T, V)
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    if not with_entropy:
        return logprobs
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


class PolicyWithValueHead(torch.nn.Module):
    """critic.init=shared: a value head on the policy's last hidden state (the actor-critic of Mnih et
    al. 2016 and of TRL's former AutoModelForCausalLMWithValueHead): one forward and one backward
    give log-probs and values, where a separate critic costs a second model's forward and backward.

    The log-probs come from the model's own forward (any logit scaling or softcapping included);
    the values from the hidden state that forward feeds its LM head. The head starts at zero, so
    the first values are 0 as with a fresh critic head."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy
        weight = self._lm_head().weight  # (V, H)
        self.v_head = torch.nn.Linear(weight.shape[1], 1, device=weight.device, dtype=weight.dtype)
        torch.nn.init.zeros_(self.v_head.weight)
        torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0, with_entropy: bool = True,
                entropy_grad: bool = True):
        """-> (B, T) log-probs, (B, T) entropies (None unless with_entropy), (B, T) values V(s_t) of the
        states before each response token."""
        fed_to_head = []
        hook = self._lm_head().register_forward_pre_hook(lambda module, args: fed_to_head.append(args[0]))
        try:
            out = response_logprobs(self.policy, input_ids, attention_mask, prompt_len, temperature, with_entropy,
                                    entropy_grad)
        finally:
            hook.remove()
        logprobs, entropy = out if with_entropy else (out, None)
        response_len = input_ids.shape[1] - prompt_len
        before_response = fed_to_head[0][:, -(response_len + 1):-1]  # (B, T, H): the state before each response token
        return logprobs, entropy, self.v_head(before_response).squeeze(-1).float()

    def _lm_head(self) -> torch.nn.Module:
        inner = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        return inner.get_output_embeddings()


def _keep_last_logits(model, n: int) -> dict:
    """{"logits_to_keep": n} when the model's forward takes it (transformers causal LMs do), else {}."""
    import inspect

    inner = getattr(model, "module", model)  # DDP / FSDP wrappers pass keywords through
    if not hasattr(inner, "forward"):  # lora.AdaptersOff: the policy's own module, run with adapters off
        inner = inner.model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


@dataclass
class Rollout:
    """Sampled responses. prompt_ids (B, P) left-padded; response_ids (B, T)."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor  # 1 up to and including the first stop token
    logprobs: torch.Tensor  # (B, T) under logits / T at sampling time
    stopped: torch.Tensor  # (B,) bool: emitted the stop token

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], 1)


def response_mask_from_tokens(tokens: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on tokens up to and including the first EOS; (mask (B,T) float, stopped (B,) bool)."""
    is_eos = (tokens == eos_id).long()
    before_or_at_first = (is_eos.cumsum(-1) - is_eos) == 0
    return before_or_at_first.float(), is_eos.any(-1)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
           top_k: int | None = None, top_p: float | None = None, noise: torch.Tensor | None = None,
           engine: str = "auto") -> Rollout:
    """Batched sampling with a KV cache (decoding.py's engines); a row leaves the batch once it has
    emitted EOS, and sampling ends when every row has.

    Log-probs are of the unfiltered distribution softmax(logits / T), the one
    training uses (top-k / top-p bias the KL estimate; the RL stage logs that).
    With `noise` ((B, max_new_tokens) uniforms in [0, 1), e.g. runtime.keyed_uniform)
    token t of row b is drawn by inverse CDF from noise[b, t]: a row's draw depends on
    its own noise only, not on the batch around it (so not on the number of ranks).
    """
    from rlhf_cli.decoding import make_decoder

    batch = prompt_ids.shape[0]
    device = prompt_ids.device
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
        logits = logits.float() / temperature  # (rows, V)
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
        logprobs[rows, t] = F.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
        steps = t + 1
        done = done | (token == eos_id)
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
    response_mask, stopped = response_mask_from_tokens(response, eos_id)
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
    lengths = rollout.response_mask.sum(-1).long().tolist()
    texts = []
    for ids, n, stopped in zip(rollout.response_ids.tolist(), lengths, rollout.stopped.tolist()):
        ids = ids[: n - 1] if stopped else ids[:n]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device,
                   engine: str = "auto") -> list[str]:
    """Greedy completions of prompt texts (evaluation)."""
    from rlhf_cli.data import encode, left_pad

    was_training = model.training
    model.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        ids, mask = left_pad([encode(tokenizer, p) for p in prompts[i:i + batch_size]], tokenizer.pad_token_id)
        rollout = sample(model, ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id,
                         tokenizer.pad_token_id, greedy=True, engine=engine)
        texts.extend(decode_responses(tokenizer, rollout))
    model.train(was_training)
    return texts


def model_summary(path: str) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- reward-model scoring (train-rm and rl)


def scoring_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids a reward model scores: the text prompt + response tokenized whole, nothing appended.

    train-rm trains on exactly these sequences and reads the score at the last token, which is
    what any client of the saved final/ does (its tokenizer on prompt + response, the one logit).
    Special tokens are not added: rendered chat prompts already carry theirs.
    """
    from rlhf_cli.data import encode

    return encode(tokenizer, prompt + response)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and mask; masks come from lengths, never from ids != pad."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], device, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of (prompt, response) texts, read at the last token: (N,) float32 on CPU.

    Prompts are already rendered text (chat prompts through the chat template).
    The same sequences and score position as train-rm's training and eval.
    """
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(prompts), batch_size):
        seqs = [scoring_ids(tokenizer, p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = pad_right(seqs, tokenizer.pad_token_id)
        scores.append(last_token_scores(model, ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)
