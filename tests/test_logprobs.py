"""Chunked log-probs (issue 15): the numbers and gradients of the full (B, T, V) computation, without
ever holding a (B, T, V) tensor.

    .venv/bin/pytest -q tests/test_logprobs.py

The reference below is the textbook computation (the model's own logits, log-softmax, gather), written
here rather than imported so the test does not compare our code with itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from rlhf_cli.models.logprobs import PolicyWithValueHead, position_ids_from_mask, response_terms

V = 4099  # not a multiple of the chunk: the last chunk is short


def llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).float()


def batch(B: int = 3, P: int = 5, T: int = 7):
    """Left-padded prompts of width P (row 1 padded by 2) and T response tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, P + T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask, P


def reference(model, ids, mask, P, temperature):
    """Textbook: all logits, log-softmax over V, the taken token's entry; entropy of the same."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp_all = F.log_softmax(logits[:, P - 1:-1].float() / temperature, dim=-1)
    logp = logp_all.gather(-1, ids[:, P:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def grads_of(model, fn):
    model.zero_grad()
    logp, ent = fn()
    loss = (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum() + 0.3 * ent.sum()
    loss.backward()
    return logp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_logprobs_entropies_and_gradients_equal_the_full_computation():
    for tie in (False, True):  # Llama 3 8B unties the head; small models tie it to the embeddings
        model = llama(tie)
        ids, mask, P = batch()
        want = grads_of(model, lambda: reference(model, ids, mask, P, 0.7))
        # 5 rows a chunk: 21 rows -> 5 chunks, the last of one row
        got = grads_of(model, lambda: response_terms(model, ids, mask, P, 0.7, with_entropy=True,
                                                     chunk_elements=5 * V)[:2])
        assert torch.allclose(got[0], want[0], atol=1e-6), (got[0] - want[0]).abs().max()
        assert torch.allclose(got[1], want[1], atol=1e-5), (got[1] - want[1]).abs().max()
        assert want[2].keys() == got[2].keys()
        for name in want[2]:
            # float32 sums in another order: 1e-6 of the gradient's own scale
            scale = want[2][name].abs().max().item()
            assert (got[2][name] - want[2][name]).abs().max() <= 1e-6 + 1e-3 * scale, (name, scale)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_op_ever_makes_a_vocabulary_sized_tensor_per_token():
    model = llama()
    ids, mask, P = batch(B=4, P=3, T=20)  # 80 response rows
    rows = 8
    with LargestTensor() as seen:
        logp, ent, _ = response_terms(model, ids, mask, P, with_entropy=True, chunk_elements=rows * V)
        (logp.sum() + ent.sum()).backward()
    hidden = model.config.hidden_size  # the (V, H) head weight and its gradient are the model's own size
    assert seen.largest <= max(rows, hidden) * V < 80 * V, seen.largest  # one chunk's logits at most
    with LargestTensor() as full:
        logp, ent = reference(model, ids, mask, P, 1.0)
        (logp.sum() + ent.sum()).backward()
    assert full.largest >= 80 * V  # the check can see the full computation's tensors


def test_softcapped_head_is_reproduced_and_an_unknown_transform_falls_back_to_the_full_path():
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=128, final_logit_softcapping=0.5)
    gemma = Gemma2ForCausalLM(cfg).float()  # cap 0.5: the cap changes every log-prob
    ids, mask, P = batch()
    with torch.no_grad():
        want, _ = reference(gemma, ids, mask, P, 1.0)
        got, _, _ = response_terms(gemma, ids, mask, P, chunk_elements=4 * V)
    assert torch.allclose(got, want, atol=1e-6)

    class Scaled(LlamaForCausalLM):  # a forward that rescales its logits in a way not reproduced by the chunks
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    torch.manual_seed(0)
    scaled = Scaled(llama().config).float()
    with torch.no_grad():
        want, _ = reference(scaled, ids, mask, P, 1.0)
        got, _, _ = response_terms(scaled, ids, mask, P, chunk_elements=4 * V)
    assert torch.allclose(got, want, atol=1e-6)


def test_shared_value_head_reads_the_hidden_states_before_each_response_token():
    model = llama()
    ids, mask, P = batch()
    shared = PolicyWithValueHead(model)
    torch.nn.init.normal_(shared.v_head.weight)
    _, _, values = shared(ids, mask, P)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    assert torch.allclose(values, shared.v_head(hidden[:, P - 1:-1]).squeeze(-1), atol=1e-6)


def test_training_log_probs_are_over_the_ids_the_sampler_can_draw():
    """A padded vocabulary (rows past the tokenizer) and a pad that is not a stop token are never sampled;
    the update's log-probs are of that same distribution (the sampler's own log-probs), not the full one."""
    from rlhf_cli.engines.rollout import sample
    from rlhf_cli.models.logprobs import Support

    model = llama().eval()
    ids, mask, P = batch(B=4, P=5, T=0)
    support = Support(vocab_limit=V - 99, never=(7,))
    rollout = sample(model, ids, mask, 12, eos_id=[3, 4], pad_id=7, noise=torch.rand(4, 12),
                     vocab_limit=support.vocab_limit, never=list(support.never))
    full_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], 1)
    full_mask = torch.cat([rollout.prompt_mask, rollout.response_mask], 1)
    m = rollout.response_mask.bool()
    assert not torch.isnan(rollout.logprobs).any()
    with torch.no_grad():
        for chunk in (None, 0, 3 * V):  # default chunks, the full path, small chunks
            got, ent, _ = response_terms(model, full_ids, full_mask, P, with_entropy=True, chunk_elements=chunk,
                                         support=support)
            assert torch.allclose(got[m], rollout.logprobs[m], atol=1e-5), chunk
            assert torch.isfinite(ent).all() and torch.isfinite(got).all()
        unrestricted = response_terms(model, full_ids, full_mask, P)[0]
    assert (unrestricted[m] - rollout.logprobs[m]).abs().max() > 1e-4  # the support matters at this size


def grouped_batch(K: int = 3, P: int = 5, T: int = 7):
    """Two prompts x K samples (rl's layout), the second prompt left-padded by 2; row 0's response ends early."""
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, V, (2, P), generator=g)
    ids = torch.cat([prompts.repeat_interleave(K, 0), torch.randint(0, V, (2 * K, T), generator=g)], 1)
    mask = torch.ones_like(ids)
    mask[K:, :2] = 0
    mask[0, -3:] = 0
    return ids, mask, P


class Embedded(torch.nn.Module):
    """Counts the tokens the model embeds: (forwards, tokens)."""

    def __init__(self, model):
        super().__init__()
        self.calls, self.tokens = 0, 0
        model.get_input_embeddings().register_forward_hook(self.count)

    def count(self, module, args, out):
        self.calls += 1
        self.tokens += args[0].numel()


def test_rows_sharing_a_prompt_run_it_once_with_the_numbers_and_gradients_of_whole_rows():
    """K samples of a prompt: the prompt goes through the model once, the responses against its cached keys and
    values; log-probs, entropies and every gradient are the whole-row computation's (float rounding)."""
    model = llama()
    ids, mask, P = grouped_batch()
    want = grads_of(model, lambda: reference(model, ids, mask, P, 0.7))
    seen = Embedded(model)
    got = grads_of(model, lambda: response_terms(model, ids, mask, P, 0.7, with_entropy=True, chunk_elements=5 * V)[:2])
    assert (seen.calls, seen.tokens) == (2, 2 * P + 6 * 6)  # 2 prompts once, 6 responses but their last token
    assert (got[0] - want[0]).abs().max() < 1e-5 and (got[1] - want[1]).abs().max() < 1e-4
    for name in want[2]:
        scale = want[2][name].abs().max().item()
        assert (got[2][name] - want[2][name]).abs().max() <= 1e-6 + 1e-3 * scale, (name, scale)


def test_a_prompt_shared_by_no_row_or_a_sliding_window_model_runs_rows_whole():
    model = llama()
    ids, mask, P = batch()  # every prompt distinct
    seen = Embedded(model)
    with torch.no_grad():
        response_terms(model, ids, mask, P)
    assert (seen.calls, seen.tokens) == (1, ids.numel())
    torch.manual_seed(0)  # Gemma 2: sliding-window layers (a cache that crops) -> whole rows, the same numbers
    cfg = Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=4)
    gemma = Gemma2ForCausalLM(cfg).float()
    ids, mask, P = grouped_batch()
    seen = Embedded(gemma)
    with torch.no_grad():
        want, _ = reference(gemma, ids, mask, P, 1.0)
        got, _, _ = response_terms(gemma, ids, mask, P, chunk_elements=4 * V)
    assert (seen.calls, seen.tokens) == (2, 2 * ids.numel())  # the reference's forward and ours, rows whole
    assert torch.allclose(got, want, atol=1e-5)


def test_the_lora_reference_shares_the_prompt_with_adapters_off():
    """rl's LoRA reference is the policy with its adapters off (lora.AdaptersOff): a cache passes through it."""
    from peft import LoraConfig, get_peft_model

    from rlhf_cli.models.lora import AdaptersOff

    peft_model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, P = grouped_batch()
    off = AdaptersOff(peft_model)
    with torch.no_grad():
        with peft_model.disable_adapter():
            want, _ = reference(peft_model.get_base_model(), ids, mask, P, 1.0)
        on, _ = reference(peft_model, ids, mask, P, 1.0)
        seen = Embedded(peft_model.get_base_model())
        got, _, _ = response_terms(off, ids, mask, P)
    assert seen.calls == 2 and torch.allclose(got, want, atol=1e-5)
    assert (on - want).abs().max() > 1e-3  # the adapters change the numbers: the check can see them left on
