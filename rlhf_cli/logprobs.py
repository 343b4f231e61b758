"""Per-token quantities from a forward pass: response log-probs (and entropies), critic values.

Shapes: B rows of left-padded prompts of width P followed by T response tokens
(input_ids (B, P + T)); everything returned is (B, T) over the response tokens.
Masks always come from lengths, never from ``ids != pad_id``.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from rlhf_cli.models import scalar_head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_values(model, input_ids, attention_mask) -> torch.Tensor:
    """Scalar head applied at every position: (B, L) float32. Critic values / RM scores."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return scalar_head(model)(hidden).squeeze(-1).float()


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


def _keep_last_logits(model, n: int) -> dict:
    """{"logits_to_keep": n} when the model's forward takes it (transformers causal LMs do), else {}."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers pass keywords through
    if not hasattr(inner, "forward"):  # lora.AdaptersOff: the policy's own module, run with adapters off
        inner = inner.model
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(inner.forward).parameters else {}


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


class TokenValues(torch.nn.Module):
    """token_values as a module, so a DDP / FSDP2 wrapper's forward (and gradient sync) runs it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return token_values(self.model, input_ids, attention_mask)  # (B, L)
