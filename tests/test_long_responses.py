"""Long responses (issue 15): 1,024 response tokens through generation, log-probs and one update, on CPU.

    .venv/bin/pytest -q tests/test_long_responses.py

The refusals (a response limit past policy.max_length or the model's positions) are rows of
tests/test_bad_inputs.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_cli.algorithms import POLICY_LOSSES
from rlhf_cli.data import encode_prompt, left_pad
from rlhf_cli.engines.rollout import SamplingParams, make_engine
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.models.embedded import write_embedded_base
from rlhf_cli.models.logprobs import response_logprobs

RESPONSE = 1024


def test_a_1024_token_response_generates_scores_and_updates(tmp_path):
    """A tiny model with 2,048 positions that never emits EOS (its EOS row of the tied head is zero, so the
    greedy pick, a positive logit, is never EOS) writes 1,024 tokens per row; the training pass's log-probs
    of those tokens equal a plain full forward's and the sampler's own, and one PPO update runs and raises them."""
    path = str(write_embedded_base(tmp_path / "base", seed=0, max_position_embeddings=2048))
    tok = load_tokenizer(path, "policy.path")
    torch.manual_seed(0)
    model = load_causal_lm(path, "policy.path")
    with torch.no_grad():
        model.get_output_embeddings().weight[tok.eos_token_id] = 0  # tied: also the (unused) input row of EOS
    prompts = ["Start at 4. add 1. sub 2.\n", "Start at 7. sub 3. add 2.\n"]  # the same length in bytes
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id)
    rollout = make_engine("auto", model, tok).generate(ids, mask, SamplingParams(RESPONSE, greedy=True))
    assert rollout.response_ids.shape == (2, RESPONSE) and not rollout.stopped.any()
    assert rollout.response_mask.sum() == 2 * RESPONSE and (rollout.response_ids < len(tok)).all()
    assert ids.shape[1] + RESPONSE <= model.config.max_position_embeddings

    P = ids.shape[1]
    with torch.no_grad():
        logprobs = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P)  # (2, 1024)
        full = F.log_softmax(model(input_ids=rollout.input_ids).logits.float(), -1)  # no padding: plain positions
        plain = full[:, P - 1:-1].gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    assert logprobs.shape == (2, RESPONSE)
    torch.testing.assert_close(logprobs, plain, atol=1e-5, rtol=0)
    # the KV-cached decoder's own: of the distribution it draws from, without the pad token and the padded rows
    drawable = model(input_ids=rollout.input_ids).logits[:, P - 1:-1, :len(tok)].float().detach()
    drawable[..., tok.pad_token_id] = float("-inf")
    sampled = F.log_softmax(drawable, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(rollout.logprobs, sampled, atol=2e-4, rtol=0)

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    advantages = torch.ones(2, RESPONSE)  # reinforce every sampled token
    new_logprobs = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P)
    loss, stats = POLICY_LOSSES.get("ppo")(new_logprobs, logprobs, advantages, rollout.response_mask)
    assert float(stats["approx_kl"]) < 1e-6  # the update starts on-policy: same log-probs, ratio 1
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    with torch.no_grad():
        after = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P)
    assert (after.mean(-1) > logprobs.mean(-1)).all()  # both rows' tokens became more likely
