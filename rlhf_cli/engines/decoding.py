"""Decoders behind `rollout.sample` (the `LocalEngine` of rollout.py): prefill the prompts, then one token per step.

Two engines with one interface (prefill -> logits, step -> logits, keep(rows)):

- `LeanDecoder` (rollout.engine=lean; `auto` picks it when it applies): the Llama
  family (llama, mistral, qwen2, qwen3). It calls the model's own modules (norms,
  projections, MLPs, rotary table, the model file's `apply_rotary_pos_emb`), so LoRA
  adapters and autocast apply as usual, but keeps a preallocated KV cache and builds
  each step's mask from one boolean row instead of going through Hugging Face's
  per-step machinery (4-D mask construction, cache objects, output dataclasses,
  keyword plumbing): 1.18x the HF engine's tokens/s on the embedded tiny model on
  CPU (docs/benchmarks.md), where kernels dominate; more where kernels are fast (GPU).
  Logits match the Hugging Face forward to float tolerance (tests/test_decoding.py).
- `HFDecoder` (rollout.engine=hf, and `auto` for every other model): the model's own
  forward with a `DynamicCache`.

Both can drop finished rows from the batch (`keep`), so the rows still writing pay
for the forwards, not the rows that have stopped; the HF engine only where every
cache layer is a plain key/value layer (`can_keep`: not the linear-attention or
state-space layers of hybrid models, whose states it could not select).
"""

from __future__ import annotations

import inspect
import sys

import torch
import torch.nn.functional as F

from rlhf_cli.errors import UserError
from rlhf_cli.models.logprobs import position_ids_from_mask
from rlhf_cli.training.distributed import is_sharded

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # tables that do not depend on the sequence length


def _unwrap(model):
    """A peft model's HF model (its LoRA layers stay in place: calling them applies the adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lean_unsupported(model, total_len: int | None = None) -> str | None:
    """Why the lean engine cannot run this model (None: it can)."""
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    if is_sharded(model):
        return "the model is FSDP-sharded"
    base = getattr(inner, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb") or not hasattr(inner, "lm_head"):
        return f"{type(inner).__name__} does not have the Llama layout (model.layers, model.rotary_emb, lm_head)"
    if not type(base.layers[0].self_attn).__module__.startswith("transformers.models."):
        return "the model's code is its own (trust_remote_code), not the transformers implementation"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        return f"rope type {rope!r} depends on the sequence length"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "only the silu MLP without tensor-parallel slicing is supported"
    if total_len is not None:
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in base.layers]
        if model_type == "mistral":  # mistral reads its window from the config
            windows.append(getattr(config, "sliding_window", None))
        if any(w is not None and w < total_len for w in windows):
            return f"a sliding attention window is shorter than prompt + response ({total_len} tokens)"
    return None


def make_decoder(model, engine: str, total_len: int):
    """The engine `rollout.engine` names ('auto': lean where it applies, else hf)."""
    if engine == "hf":
        return HFDecoder(model)
    reason = lean_unsupported(model, total_len)
    if reason is None:
        return LeanDecoder(model)
    if engine == "lean":
        raise UserError(f"rollout.engine=lean: {reason}; use rollout.engine=auto (or hf)")
    return HFDecoder(model)


class LeanDecoder:
    """KV-cache decoding through a Llama-family model's own modules (see the module docstring)."""

    can_keep = True

    def __init__(self, model):
        inner = _unwrap(model)
        self.base, self.lm_head = inner.model, inner.lm_head
        self.layers = list(self.base.layers)
        self.rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Run the left-padded prompts (B, P); -> next-token logits (B, V)."""
        B, P = ids.shape
        self.capacity = P + max_new_tokens
        positions = position_ids_from_mask(mask)
        ahead = positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=ids.device)
        h = self.base.embed_tokens(ids)
        # rotary tables for every position a row will reach, once (the same call the HF forward makes)
        self.cos, self.sin = self.base.rotary_emb(h, torch.cat([positions, ahead], 1))
        self.valid = torch.zeros(B, self.capacity, dtype=torch.bool, device=ids.device)
        self.valid[:, :P] = mask.bool()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        # a padding query attends to itself only: its (unused) output stays finite
        attn = (causal & self.valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=ids.device)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.length = 0
        return self._forward(h, attn)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,); -> next-token logits (B, V)."""
        self.valid[:, self.length] = True
        return self._forward(self.base.embed_tokens(tokens[:, None]), self.valid[:, None, None, :self.length + 1])

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with these rows (indices into the current batch) only."""
        self.cache = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cache]
        self.valid, self.cos, self.sin = (t.index_select(0, rows) for t in (self.valid, self.cos, self.sin))

    def _forward(self, h: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        start, S = self.length, h.shape[1]
        cos, sin = self.cos[:, start:start + S], self.sin[:, start:start + S]
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), cos, sin, attn_mask, start)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.length += S
        return self.lm_head(self.base.norm(h[:, -1]))

    def _attention(self, i, attn, x, cos, sin, attn_mask, start):
        B, S, _ = x.shape
        q = attn.q_proj(x).view(B, S, -1, attn.head_dim)
        k = attn.k_proj(x).view(B, S, -1, attn.head_dim)
        v = attn.v_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):  # qwen3: RMSNorm over each head before rotary
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        if i == len(self.cache):  # first forward: the cache, sized for prompt + every new token
            shape = (B, k.shape[1], self.capacity, attn.head_dim)
            self.cache.append((k.new_zeros(shape), v.new_zeros(shape)))
        k_cache, v_cache = self.cache[i]
        k_cache[:, :, start:start + S] = k
        v_cache[:, :, start:start + S] = v
        keys, values = k_cache[:, :, :start + S], v_cache[:, :, :start + S]
        if keys.shape[1] != q.shape[1]:  # grouped-query attention
            keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
            values = values.repeat_interleave(q.shape[1] // values.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class HFDecoder:
    """The model's own forward with a DynamicCache (any causal LM)."""

    def __init__(self, model):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        self.model = model
        inner = _unwrap(model)
        params = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self.cache = DynamicCache(config=self.model.config)  # filled in place by every forward
        self.can_keep = all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                            for layer in getattr(self.cache, "layers", [None]))

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.mask = mask.long()
        positions = position_ids_from_mask(self.mask)
        self.next_pos = positions[:, -1] + 1
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.next_pos[:, None],
                         use_cache=True, **{self.cache_kw: self.cache})
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1]

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]
