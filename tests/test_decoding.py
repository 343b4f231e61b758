"""The decoding engines: the lean engine computes what the Hugging Face forward computes, for every
architecture it accepts; rows that stopped leave the batch; a prompt repeated K times is prefilled once."""

from __future__ import annotations

import pytest
import torch

from rlhf_cli.engines.decoding import HFDecoder, LeanDecoder, lean_unsupported, make_decoder
from rlhf_cli.engines.rollout import sample
from rlhf_cli.errors import UserError
from rlhf_cli.models.logprobs import position_ids_from_mask

VOCAB, EOS, PAD = 24, 1, 0
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)


def build(model_type: str, **overrides):
    """A random tiny model of that architecture, from a standard transformers config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**SMALL, **overrides}
    if model_type in ("qwen2", "qwen3", "mistral"):
        kw.setdefault("sliding_window", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw)).eval()
    with torch.no_grad():  # bias-free layers are zero-initialised by some configs: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    return model


def left_padded(batch: int = 6, width: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (batch,), generator=g)
    lengths[0] = width
    ids = torch.randint(2, VOCAB, (batch, width), generator=g)
    mask = (torch.arange(width)[None] >= width - lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


ARCHITECTURES = {
    "llama": dict(),
    "llama-gqa": dict(num_key_value_heads=2),
    "qwen2-bias-gqa": dict(num_key_value_heads=2),
    "qwen3-qk-norm": dict(num_key_value_heads=2, head_dim=8),
    "mistral": dict(num_key_value_heads=1),
}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_lean_engine_logits_match_the_full_forward(name):
    """Prefill and 5 decode steps of the lean engine == logits of one full HF forward over the sequence."""
    model = build(name.split("-")[0], **ARCHITECTURES[name])
    assert lean_unsupported(model) is None
    ids, mask = left_padded()
    g = torch.Generator().manual_seed(1)
    steps = torch.randint(2, VOCAB, (ids.shape[0], 5), generator=g)
    full_ids = torch.cat([ids, steps], 1)
    full_mask = torch.cat([mask, torch.ones_like(steps)], 1)
    with torch.no_grad():
        want = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)).logits
        decoder = LeanDecoder(model)
        got = [decoder.prefill(ids, mask, 5)] + [decoder.step(steps[:, t]) for t in range(4)]
    P = ids.shape[1]
    for t, logits in enumerate(got):
        assert torch.allclose(logits, want[:, P - 1 + t], atol=1e-5), (name, t, (logits - want[:, P - 1 + t]).abs().max())


def test_both_engines_sample_the_same_tokens_while_rows_stop_and_leave():
    """With keyed noise both engines draw the same tokens and log-probs, rows stopping at many different
    steps (so the lean batch shrinks several times) and prompts repeated (prefilled once)."""
    model = build("llama", num_key_value_heads=2)
    ids, mask = left_padded(batch=4)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)  # 4 prompts x 4 samples
    noise = torch.rand(16, 30, generator=torch.Generator().manual_seed(3))
    runs = {e: sample(model, ids, mask, 30, EOS, PAD, temperature=1.5, noise=noise, engine=e) for e in ("hf", "lean")}
    lengths = runs["lean"].response_mask.sum(-1)
    assert runs["lean"].stopped.sum() >= 8 and len(set(lengths.tolist())) >= 5  # the test exercises dropping rows
    assert torch.equal(runs["hf"].response_ids, runs["lean"].response_ids)
    assert torch.equal(runs["hf"].response_mask, runs["lean"].response_mask)
    assert torch.allclose(runs["hf"].logprobs, runs["lean"].logprobs, atol=1e-5)


@pytest.mark.parametrize("engine", ["hf", "lean"])
def test_stopped_rows_leave_the_batch_and_repeated_prompts_are_prefilled_once(engine):
    model = build("llama")
    seen = []  # rows of every forward, read by a hook on the real embedding
    model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    ids, mask = left_padded(batch=3)
    ids, mask = ids.repeat_interleave(8, 0), mask.repeat_interleave(8, 0)
    noise = torch.rand(24, 30, generator=torch.Generator().manual_seed(4))
    rollout = sample(model, ids, mask, 30, EOS, PAD, temperature=1.5, noise=noise, engine=engine)
    assert seen[0] == (3, ids.shape[1])  # prefill: the 3 distinct prompts, not 24 rows
    decode_rows = [rows for rows, width in seen[1:]]
    assert decode_rows[0] <= 24 and decode_rows == sorted(decode_rows, reverse=True)
    still_going = [int((rollout.response_mask.sum(-1) > t + 1).sum()) for t in range(len(decode_rows))]
    # each forward carries the rows still writing plus at most an eighth that stopped since the last drop
    assert all(going <= rows <= max(going, 1) * 8 // 7 + 1 for going, rows in zip(still_going, decode_rows))
    assert decode_rows[-1] < 24


def test_lora_adapters_apply_in_the_lean_engine():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init would hide a skipped adapter
    ids, mask = left_padded()
    noise = torch.rand(6, 12, generator=torch.Generator().manual_seed(5))
    lean = sample(model, ids, mask, 12, EOS, PAD, noise=noise, engine="lean")
    hf = sample(model, ids, mask, 12, EOS, PAD, noise=noise, engine="hf")
    with model.disable_adapter():
        off = sample(model, ids, mask, 12, EOS, PAD, noise=noise, engine="lean")
    assert torch.allclose(lean.logprobs, hf.logprobs, atol=1e-5) and torch.equal(lean.response_ids, hf.response_ids)
    assert not torch.allclose(lean.logprobs, off.logprobs, atol=1e-3)


def test_auto_falls_back_to_the_model_forward_and_lean_says_why_not():
    gpt2 = build("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=128)
    assert "gpt2" in lean_unsupported(gpt2)
    assert isinstance(make_decoder(gpt2, "auto", 40), HFDecoder)
    with pytest.raises(UserError, match="rollout.engine=lean: model type 'gpt2'.*rollout.engine=auto"):
        make_decoder(gpt2, "lean", 40)
    ids, mask = left_padded()
    out = sample(gpt2, ids, mask, 6, EOS, PAD, greedy=True)  # auto: the model's own forward, rows dropped as they stop
    assert out.response_ids.shape[0] == 6 and 1 <= out.response_ids.shape[1] <= 6


def test_a_sliding_window_shorter_than_the_sequence_is_not_lean():
    model = build("mistral", sliding_window=16)
    assert lean_unsupported(model, total_len=16) is None
    assert "sliding attention window" in lean_unsupported(model, total_len=17)
    assert isinstance(make_decoder(model, "auto", 17), HFDecoder)


def test_hybrid_caches_keep_every_row_and_still_sample():
    """A hybrid model (linear-attention + full-attention layers): its cache cannot select rows, so the
    HF engine keeps every row, and repeated prompts are prefilled as they are."""
    model = build("qwen3_5_text", num_key_value_heads=2, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2,
                  linear_key_head_dim=8, linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
    assert isinstance(make_decoder(model, "auto", 40), HFDecoder) and not HFDecoder(model).can_keep
    ids, mask = left_padded(batch=3, width=6)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    noise = torch.rand(6, 20, generator=torch.Generator().manual_seed(3))
    rollout = sample(model, ids, mask, 20, EOS, PAD, temperature=1.5, noise=noise)
    lengths = rollout.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows stopped at different steps
    for r in range(6):  # each row as if sampled alone: the batch around it did not change its tokens
        alone = sample(model, ids[r:r + 1], mask[r:r + 1], 20, EOS, PAD, temperature=1.5, noise=noise[r:r + 1])
        n = int(lengths[r])
        assert torch.equal(alone.response_ids[0, :n], rollout.response_ids[r, :n]), r


def test_remote_code_models_are_not_lean(tmp_path):
    """A model whose modules are not transformers' own (as with trust_remote_code) uses its own forward."""
    model = build("llama")
    attn = model.model.layers[0].self_attn
    attn.__class__ = type("RemoteAttention", (type(attn),), {"__module__": "transformers_modules.someone.model"})
    assert "its own" in lean_unsupported(model)
    assert isinstance(make_decoder(model, "auto", 40), HFDecoder)


def test_the_rl_policy_keeps_gradient_checkpointing_with_dropout_off_across_rollouts():
    """rl's policy: dropout off (models.dropout_off), yet transformers checkpoints its layers only in training mode;
    plain eval() turned policy.gradient_checkpointing off. Each layer runs twice a step when checkpointed (the
    forward, then its recompute in the backward), before and after a rollout (which restores every module's mode)."""
    from rlhf_cli.engines.rollout import LocalEngine, SamplingParams
    from rlhf_cli.models import dropout_off

    model = build("llama", attention_dropout=0.5)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dropout_off(model)
    calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))  # the recompute calls forward
    ids = torch.randint(0, model.config.vocab_size, (2, 6))

    def runs_a_layer() -> float:
        calls.clear()
        model(input_ids=ids).logits.sum().backward()
        return len(calls) / len(model.model.layers)

    assert runs_a_layer() == 2
    with torch.no_grad():  # dropout 0.5 is off: the same logits twice
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    LocalEngine(model, stop_ids=[1], pad_id=0).generate(ids, torch.ones_like(ids), SamplingParams(4))
    assert runs_a_layer() == 2
    model.eval()  # what rl did before: checkpointing silently off
    assert runs_a_layer() == 1
