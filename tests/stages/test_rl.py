"""`rlhf rl`: the ALGORITHMS.md checklist on real tiny models, end-to-end learning, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from helpers import QUICK_RL as SMALL
from helpers import assert_rl_resume_is_bit_identical
from helpers import read_metrics as metrics
from rlhf_cli import data, task
from rlhf_cli.engines.rollout import response_mask_from_tokens, sample
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.models import frozen
from rlhf_cli.models.logprobs import response_logprobs
from rlhf_cli.training.optim import StepGuard



@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir), "p"), frozen(load_causal_lm(str(tiny_model_dir), "p"))


def _prompts(tok, n=4):
    rows = task.prompt_rows(n, split="eval")
    return data.left_pad([data.encode(tok, r["prompt"]) for r in rows], tok.pad_token_id)


# --- checklist 3, 4, 5, 6: sampling, temperature, padding, stop tokens

def test_logprobs_come_from_logits_over_temperature_everywhere(policy):
    tok, model = policy
    ids, mask = _prompts(tok)
    g = torch.Generator().manual_seed(0)
    rollout = sample(model, ids, mask, 12, tok.eos_token_id, tok.pad_token_id, temperature=0.7, generator=g)
    P = ids.shape[1]
    at_t = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P, temperature=0.7)
    at_1 = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P, temperature=1.0)
    m = rollout.response_mask.bool()
    assert torch.allclose(at_t[m], rollout.logprobs[m], atol=1e-5)  # rollout == training forward
    assert not torch.allclose(at_1[m], rollout.logprobs[m], atol=1e-3)


def test_sampling_is_pure_and_matches_the_model_distribution(policy):
    """Without top-k/top-p the empirical first-token distribution matches softmax(logits / T)."""
    tok, model = policy
    ids, mask = _prompts(tok, 1)
    n = 4000
    g = torch.Generator().manual_seed(1)
    rollout = sample(model, ids.repeat(n, 1), mask.repeat(n, 1), 1, tok.eos_token_id, tok.pad_token_id,
                     temperature=1.3, generator=g)
    probs = torch.softmax(model(input_ids=ids, attention_mask=mask).logits[0, -1] / 1.3, -1)
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=probs.numel()).float() / n
    assert (counts - probs).abs().max() < 0.03


def test_left_padding_does_not_change_logprobs(policy):
    tok, model = policy
    seq = data.encode(tok, "Start at 3. add 1. sub 2. add 3.\n3+1=4. 4-2=2.")
    prompt_len = 33
    plain = torch.tensor([seq])
    padded_ids, padded_mask = data.left_pad([seq, seq + [0] * 5], tok.pad_token_id)  # row 0 gets 5 left pads
    a = response_logprobs(model, plain, torch.ones_like(plain), prompt_len)
    b = response_logprobs(model, padded_ids[:1], padded_mask[:1], prompt_len + 5)
    assert torch.allclose(a, b, atol=1e-5)


def test_concatenated_rollouts_keep_every_rows_tokens_and_log_probs(policy):
    """Dynamic sampling stacks groups from different draws: re-padded to the widest prompt and response, each row
    keeps its masks, ids and (recomputed) log-probs exactly."""
    from rlhf_cli.engines.rollout import concat_rollouts, select_rows

    tok, model = policy
    torch.manual_seed(0)
    ids_a, mask_a = _prompts(tok, 2)
    ids_b, mask_b = data.left_pad([data.encode(tok, "Start at 1. add 1.")] * 2, tok.pad_token_id)  # shorter prompts
    a = sample(model, ids_a, mask_a, 6, tok.eos_token_id, tok.pad_token_id)
    b = sample(model, ids_b, mask_b, 3, tok.eos_token_id, tok.pad_token_id)
    both = concat_rollouts([select_rows(a, slice(0, 2)), b], tok.pad_token_id)
    P, T = max(ids_a.shape[1], ids_b.shape[1]), max(a.response_ids.shape[1], b.response_ids.shape[1])
    assert both.prompt_ids.shape == (4, P) and both.response_ids.shape == (4, T)
    assert both.prompt_mask.sum(1).tolist() == mask_a.sum(1).tolist() + mask_b.sum(1).tolist()
    assert both.response_mask.sum(1).tolist() == a.response_mask.sum(1).tolist() + b.response_mask.sum(1).tolist()
    assert both.stopped.tolist() == a.stopped.tolist() + b.stopped.tolist()
    merged = response_logprobs(model, both.input_ids, both.attention_mask, P) * both.response_mask
    alone = response_logprobs(model, b.input_ids, b.attention_mask, ids_b.shape[1]) * b.response_mask
    torch.testing.assert_close(merged[2:, :alone.shape[1]], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both.logprobs[2:, :b.logprobs.shape[1]], b.logprobs)
    assert (both.logprobs[2:, b.logprobs.shape[1]:] == 0).all()


def test_masks_come_from_lengths_even_when_pad_equals_eos():
    eos = pad = 7
    tokens = torch.tensor([[1, 2, eos, pad, pad], [eos, pad, pad, pad, pad], [1, 2, 3, 4, 5]])
    mask, stopped = response_mask_from_tokens(tokens, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert stopped.tolist() == [True, True, False]


def test_generation_stops_when_every_row_has_stopped(policy):
    tok, model = policy
    ids, mask = _prompts(tok)
    # force EOS: a model whose lm_head always prefers EOS
    import copy
    eager = copy.deepcopy(model)
    with torch.no_grad():
        eager.lm_head.weight.zero_()
        eager.lm_head.weight[tok.eos_token_id] = 0  # keep tied embedding untouched beyond zeroing
        eager.lm_head.bias = None
    bias_logits = torch.zeros(eager.config.vocab_size)
    bias_logits[tok.eos_token_id] = 50.0
    eager.lm_head.register_forward_hook(lambda mod, inp, out: out + bias_logits)
    rollout = sample(eager, ids, mask, 30, tok.eos_token_id, tok.pad_token_id, greedy=True)
    assert rollout.response_ids.shape[1] == 1  # stopped after the first token, not 30
    assert rollout.stopped.all() and rollout.response_mask.sum() == ids.shape[0]


# --- checklist 11, 12

@pytest.mark.parametrize("dtypes, want", [
    ([], torch.float32),  # CPU default: the policy's dtype (fp32); bf16 is the default on CUDA only
    (["reference.dtype=bf16", "reward.model.dtype=bf16"], torch.bfloat16),
], ids=["default", "bf16"])
def test_the_stage_freezes_the_reference_and_reward_model_it_builds(tiny_model_dir, tmp_path, dtypes, want):
    """The RL recipe's own models after setup: reference and reward model in eval mode without gradients and
    outside the optimizer, in the dtype asked for; the policy in eval mode (dropout off) with every
    parameter training, in fp32 whatever the frozen models' dtype."""
    import dataclasses

    from rlhf_cli.commands.compose import compose_config
    from rlhf_cli.models import load_scalar_head_model, load_tokenizer
    from rlhf_cli.stages.rl import RLRecipe
    from rlhf_cli.training import runtime
    from rlhf_cli.training.checkpoint import RunDir

    reward_model = tmp_path / "rm"  # a reward model's layout: the tiny model with a one-output score head
    load_scalar_head_model(str(tiny_model_dir), "reward.model.path").save_pretrained(reward_model)
    load_tokenizer(str(tiny_model_dir), "reward.model.path").save_pretrained(reward_model)
    cfg = compose_config("rl", [f"policy.path={tiny_model_dir}", "algorithm=ppo", "reward=rule_rm",
                                f"reward.model.path={reward_model}", f"output_dir={tmp_path / 'run'}", "device=cpu",
                                "device.threads=1", "data.num_train=8", "data.num_eval=4", "rollout.prompts_per_step=4",
                                *dtypes])
    rt = runtime.setup(cfg.device, cfg.seed, cfg.placement)
    run_dir = RunDir(tmp_path / "run", dataclasses.asdict(cfg), "rl", rt.is_main)
    recipe = RLRecipe(cfg, rt, run_dir, 0.0)
    try:
        recipe.setup()
        recipe.tracker.close()
    finally:
        run_dir.release()
        runtime.teardown()
    trained = {id(p) for group in recipe.optimizer.param_groups for p in group["params"]}
    policy_params = {id(p) for p in recipe.policy.parameters()}
    for name, model in (("reference", recipe.reference), ("reward model", recipe.reward_model)):
        params = list(model.parameters())
        assert not model.training and not any(p.requires_grad for p in params), name
        assert not {id(p) for p in params} & (trained | policy_params), f"{name} shares tensors with what trains"
        assert {p.dtype for p in params} == {want}, name
    assert {p.dtype for p in recipe.policy.parameters()} == {torch.float32}
    assert not recipe.policy.training and policy_params <= trained
    assert all(p.requires_grad for p in recipe.policy.parameters())


def test_gradient_clipping_reports_the_pre_clip_norm():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    (w * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()
    norm, applied = StepGuard(max_grad_norm=1.0).step([w], opt, 0.0)
    assert applied and abs(norm - 5.0) < 1e-6
    assert torch.allclose(w.detach(), -torch.tensor([0.6, 0.8, 0.0, 0.0]))  # the step used the clipped gradient


def test_non_finite_steps_are_not_applied():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=1.0)
    guard = StepGuard(max_grad_norm=1.0, max_bad_steps=2)
    (w * float("nan")).sum().backward()
    _, applied = guard.step([w], opt, float("nan"))
    assert not applied and torch.equal(w.detach(), torch.ones(2))


# --- end to end: each algorithm raises held-out accuracy over the SFT checkpoint

# a2c in make test-slow: two minutes of CPU a run, and the default run must stay under 12 minutes with the
# real-checkpoint tests; its critic, GAE and update are PPO's with one pass, which the ppo case covers
@pytest.mark.parametrize("algorithm, extra", [("reinforce", []), pytest.param("a2c", [], marks=pytest.mark.slow),
                                              pytest.param("ppo", [], marks=pytest.mark.slow),
                                              pytest.param("ppo", ["critic.init=shared"], marks=pytest.mark.slow)],
                         ids=["reinforce", "a2c", "ppo", "ppo-shared-critic"])
def test_each_algorithm_raises_held_out_accuracy(sft_run, tmp_path, algorithm, extra):
    out = tmp_path / "rl"
    proc = run_cli("rl", f"algorithm={algorithm}", f"policy.path={sft_run / 'final'}", f"output_dir={out}",
                   "max_steps=25", "eval.every=1000", "data.num_eval=100", *extra, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    before, after = manifest["metrics_before"]["eval_accuracy"], manifest["metrics"]["eval_accuracy"]
    assert after >= before + 0.30, (before, after)
    train = [r for r in metrics(out) if r["kind"] == "train"]
    for key in ("score", "kl", "entropy", "response_len", "stop_fraction", "grad_norm", "tokens_per_s", "kl_coef"):
        assert key in train[-1], key  # checklist 15
    if algorithm != "reinforce":
        assert "value_loss" in train[-1] and "explained_variance" in train[-1]
    if algorithm == "ppo":
        assert "clip_frac" in train[-1] and "ratio_mean" in train[-1]
    assert manifest["parent_run"] == str(sft_run.resolve())
    assert "kl.coef=0.05" in manifest["derived_defaults"]  # left null: recorded as derived, not set
    # the reference is the SFT model and stays it: KL 0 before the first update, then the policy moves away from
    # it while the reference does not. Exactly 0 where the update's own forward gives the old log-probs (one pass,
    # one micro-batch: the reference computes as the policy does); PPO's several passes take the sampler's, which
    # decoding computed token by token with a cache: fp32 rounding from a whole forward (a different model: >0.1)
    first = train[0]["kl"]
    assert (first == 0.0 if algorithm != "ppo" or extra else abs(first) < 1e-6), first
    assert train[-1]["kl"] > 1e-3, [r["kl"] for r in train]


def test_process_reward_raises_held_out_accuracy(sft_run, tmp_path):
    """A process reward (one value per written step, each on its step's last token) trains end to end."""
    out = tmp_path / "rl"
    proc = run_cli("rl", "algorithm=reinforce", "reward.functions=[rlhf_cli.task:step_correctness_reward]",
                   f"policy.path={sft_run / 'final'}", f"output_dir={out}", "max_steps=10", "eval.every=1000",
                   "data.num_eval=100", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    before, after = manifest["metrics_before"]["eval_accuracy"], manifest["metrics"]["eval_accuracy"]
    assert after >= before + 0.30, (before, after)
    train = [r for r in metrics(out) if r["kind"] == "train"]
    # the summed process reward of a response: +-0.2 per step plus 1 for the right answer
    assert train[-1]["rule_reward"] > train[0]["rule_reward"]


def test_ppo_first_minibatch_has_ratio_one_even_with_dropout_in_the_config(tmp_path, tiny_model_dir):
    """Checklist 1 + 2: dropout is off in every model during RL, so the first minibatch's ratio is exactly 1."""
    from transformers import AutoModelForCausalLM

    dropout_dir = tmp_path / "dropout_model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    model.save_pretrained(dropout_dir)
    load_tokenizer(str(tiny_model_dir), "t").save_pretrained(dropout_dir)
    out = tmp_path / "rl"
    proc = run_cli("rl", "algorithm=ppo", f"policy.path={dropout_dir}", f"output_dir={out}", "max_steps=3",
                   "algorithm.epochs=2", "algorithm.minibatches=2", "rollout.max_new_tokens=12", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    train = [r for r in metrics(out) if r["kind"] == "train"]
    assert len(train) == 3
    for r in train:
        assert r["first_mb_ratio_dev"] < 1e-5 and r["first_mb_clip_frac"] == 0 and abs(r["first_mb_approx_kl"]) < 1e-6


def test_shared_critic_is_the_policy_forward_plus_a_zero_value_head(policy):
    """critic.init=shared: the same log-probs as the policy's own forward, values 0 at the start, and the
    value loss trains the head and the backbone it shares with the policy."""
    from rlhf_cli.models.logprobs import PolicyWithValueHead

    tok, frozen_model = policy
    model = load_causal_lm(str(frozen_model.name_or_path), "p")
    shared = PolicyWithValueHead(model)
    ids, mask = _prompts(tok)
    g = torch.Generator().manual_seed(0)
    rollout = sample(model, ids, mask, 10, tok.eos_token_id, tok.pad_token_id, generator=g)
    P = ids.shape[1]
    logprobs, entropy, values = shared(rollout.input_ids, rollout.attention_mask, P, 0.7)
    want, want_entropy = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P, 0.7, with_entropy=True)
    assert torch.allclose(logprobs, want, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
    assert values.shape == logprobs.shape and torch.equal(values, torch.zeros_like(values))
    ((values - 1.0) ** 2).mean().backward()
    assert shared.v_head.weight.grad.abs().sum() > 0
    shared.v_head.weight.data.normal_()  # with a non-zero head the value loss reaches the shared backbone
    model.zero_grad()
    ((shared(rollout.input_ids, rollout.attention_mask, P)[2] - 1.0) ** 2).mean().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_shared_critic_log_probs_are_the_models_own_when_it_scales_its_logits():
    """Granite divides its logits by config.logits_scaling after the LM head: the shared critic's
    log-probs still equal the model's forward (they come from it), values from what feeds the head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.models.logprobs import PolicyWithValueHead

    torch.manual_seed(0)
    config = AutoConfig.for_model("granite", vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, logits_scaling=8.0, eos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(2, 24, (3, 12))
    mask = torch.ones_like(ids)
    shared = PolicyWithValueHead(model)
    torch.nn.init.normal_(shared.v_head.weight)
    logprobs, _, values = shared(ids, mask, 5, 0.9)
    assert torch.allclose(logprobs, response_logprobs(model, ids, mask, 5, 0.9), atol=1e-6)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(values, shared.v_head(hidden[:, 4:-1]).squeeze(-1), atol=1e-5)


FORWARD_COUNTER = """
import collections, json, sys, torch
from transformers import PreTrainedModel
counts = collections.defaultdict(lambda: [0, 0])
def hook(module, args, output):  # every forward of a decoder stack (LlamaModel): by model, with / without grad
    if isinstance(module, PreTrainedModel) and type(module).__name__.endswith("Model"):
        counts[id(module)][0 if torch.is_grad_enabled() else 1] += 1
torch.nn.modules.module.register_module_forward_hook(hook)
from rlhf_cli.cli import main
try:
    main(sys.argv[1:])
finally:
    print("COUNTS", json.dumps(sorted(counts.values())))
"""


# a policy or reference forward over rows that share prompts is two decoder calls (the distinct prompts, then the
# responses on their cached keys and values: logprobs.shared_prefix_inputs); the critic's runs rows whole
@pytest.mark.parametrize("algorithm, extra, per_step", [
    ("reinforce", [], [[0, 2], [2, 0]]),  # reference (no grad); policy: the update's forward only
    # PPO, fp32: the policy's old log-probs are the sampler's (no policy forward without grad); critic: 4 + 1, rows whole
    ("ppo", ["algorithm.epochs=2", "algorithm.minibatches=2"], [[0, 2], [4, 1], [8, 0]]),
    ("ppo", ["algorithm.epochs=2", "algorithm.minibatches=2", "critic.init=shared"], [[0, 2], [8, 2]]),
], ids=["reinforce", "ppo", "ppo-shared-critic"])
def test_forwards_per_step(tmp_path, tiny_model_dir, algorithm, extra, per_step):
    """Decoder forwards per step, per model, with and without gradients. A one-pass update (epochs =
    minibatches = 1) takes the old log-probs from its own forward; PPO's K x M passes take the sampler's
    (fp32), and only the critic runs a no-grad forward for its values; a shared critic (a value head on the
    policy) runs no model of its own, and the policy's no-grad forward gives log-probs and values at once. Sampling and evaluation (the lean
    engine) run no whole-decoder forward."""  # counts sorted: [grad, no-grad] calls of each model
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FORWARD_COUNTER, "rl", f"algorithm={algorithm}", *extra,
                           f"policy.path={tiny_model_dir}", "output_dir=out", "max_steps=2", "rollout.max_new_tokens=8",
                           *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout.split("COUNTS", 1)[1])
    assert counts == [[2 * g, 2 * n] for g, n in per_step]


def test_reference_is_frozen_and_final_loads(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    sft_before = load_file(sft_run / "final" / "model.safetensors")
    out = tmp_path / "rl"
    proc = run_cli("rl", f"policy.path={sft_run / 'final'}", f"output_dir={out}", "max_steps=2", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rl = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert any(not torch.equal(sft_before[k], rl[k]) for k in sft_before)  # the policy trained
    sft_after = load_file(sft_run / "final" / "model.safetensors")
    assert all(torch.equal(sft_before[k], sft_after[k]) for k in sft_before)  # its source was never written


# the shared critic's one-update equality under DDP stays in the default run (test_distributed.py); its learning and
# resume variants (~16 s of CPU each) run with make test-slow, to keep the default run under 10 minutes
@pytest.mark.parametrize("extra", [[], pytest.param(["critic.init=shared"], marks=pytest.mark.slow)],
                         ids=["critic", "shared-critic"])
def test_rl_resume_gives_identical_weights(sft_run, tmp_path, extra):
    # three steps straight against one, then a resume for two more: PPO, its critic and the adaptive KL
    # coefficient all carry state across the checkpoint at step 1
    common = ["algorithm=ppo", f"policy.path={sft_run / 'final'}", "kl.target=0.05", "checkpoint.every=1", *SMALL,
              *extra]
    assert_rl_resume_is_bit_identical(tmp_path, common)
    kl_a = [r["kl_coef"] for r in metrics(tmp_path / "a") if r["kind"] == "train"]
    kl_b = [r["kl_coef"] for r in metrics(tmp_path / "b") if r["kind"] == "train"]
    assert kl_a == kl_b and len(set(kl_a)) > 1  # the adaptive KL state resumed too


def _reward_module(tmp_path, body: str) -> dict:
    (tmp_path / "myrewards.py").write_text(body)
    return {"PYTHONPATH": str(tmp_path)}


@pytest.mark.parametrize("body,fragment", [
    ("def score(prompt, response, **row):\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom (prompt"),
    ("def score(prompt, response, **row):\n    return 'high'\n", "not a finite number (prompt"),
])
def test_bad_reward_functions_name_the_prompt(tmp_path, tiny_model_dir, body, fragment):
    env = _reward_module(tmp_path, body)
    proc = run_cli("rl", f"policy.path={tiny_model_dir}", "reward.functions=[myrewards:score]", "output_dir=out",
                   "max_steps=1", "rollout.max_new_tokens=4", *SMALL, cwd=tmp_path, env=env)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize("extra, config_keys, train_keys", [
    (["algorithm=ppo", "algorithm.clip_ratio_c=3.0", "algorithm.loss_agg=seq-mean-token-sum-norm", "kl.estimator=k2",
      "algorithm.epochs=2", "algorithm.minibatches=2", "reward.overlong_buffer=4"],
     {"algorithm": {"clip_ratio_c": 3.0, "loss_agg": "seq-mean-token-sum-norm"}, "kl": {"estimator": "k2"},
      "reward": {"overlong_buffer": 4}}, {"clip_frac_lower", "overlong_penalty"}),
    (["algorithm.baseline=group_norm_unbiased", "algorithm.loss_agg=seq-mean-token-mean", "kl.estimator=k3_clamped",
      "eval.samples=4"],
     {"algorithm": {"baseline": "group_norm_unbiased", "loss_agg": "seq-mean-token-mean"},
      "kl": {"estimator": "k3_clamped"}, "eval": {"pass_k": [4]}}, set()),
], ids=["ppo-dual-clip-drgrpo-k2-overlong", "grpo-unbiased-seq-mean-k3-clamped-eval-samples"])
def test_reasoning_options_run_end_to_end(tmp_path, tiny_model_dir, extra, config_keys, train_keys):
    """Issue 20's options through the real CLI: the run finishes, the saved config holds them, the update ran on
    finite numbers, and the options' own stats are logged (dual clip: clip_frac_lower; overlong shaping: its mean
    penalty; each of the three reward functions its own mean; eval.samples=4: the
    held-out evaluations before and after carry pass@1, pass@4 and maj@4 beside greedy accuracy)."""
    out = tmp_path / "rl"
    # the shipped reasoning rewards, plus one that varies within a group on an untrained model (digits written)
    env = _reward_module(tmp_path, "def digits(prompt, response, **row):\n    return sum(map(str.isdigit, response)) / 4\n")
    rewards = "reward.functions=[rlhf_cli.reasoning:answer_reward,rlhf_cli.reasoning:format_reward,myrewards:digits]"
    proc = run_cli("rl", *extra, f"policy.path={tiny_model_dir}", f"output_dir={out}", "max_steps=2", rewards,
                   "rollout.max_new_tokens=8", *SMALL, "data.num_eval=2", "eval.max_new_tokens=4", "device=cpu",
                   "device.threads=1", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "config.json").read_text())
    for group, values in config_keys.items():
        assert {k: saved[group][k] for k in values} == values
    train = [r for r in metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert train_keys <= r.keys()
        assert all(torch.isfinite(torch.tensor(float(r[k]))) for k in ("loss", "grad_norm", "kl", "entropy"))
        assert r["grad_norm"] > 0  # the loss reached the weights
        sources = rewards.partition("[")[2].rstrip("]").split(",")  # each source's mean, and the rules' sum
        assert r["rule_reward"] == pytest.approx(sum(r[f"reward/{name}"] for name in sources), abs=1e-5)
        if "overlong_penalty" in train_keys:  # 8-token limit, free up to 4: an untrained policy rarely stops sooner
            assert -1 <= r["overlong_penalty"] < 0
    evals = [r for r in metrics(out) if r["kind"] == "eval"]
    sampled = {"eval_pass@1", "eval_pass@4", "eval_maj@4"}
    if "eval.samples=4" in extra:
        assert len(evals) == 2 and all(sampled | {"eval_accuracy"} <= r.keys() for r in evals)
        assert all(0 <= r["eval_pass@1"] <= r["eval_pass@4"] <= 1 for r in evals)
    else:
        assert evals and not any(sampled & r.keys() for r in evals)  # greedy only unless asked


@pytest.mark.parametrize("reward_body, informative", [
    ("def score(prompt, response, **row):\n    return 0.0\n", False),  # every group flat: all draws, topped up
    pytest.param("def score(prompt, response, **row):\n    return float(len(response) % 2)\n", True,
                 marks=pytest.mark.slow),  # flat groups now and then: also checked by the resume test below
], ids=["flat-rewards", "some-signal"])
def test_dynamic_sampling_draws_until_groups_differ(tmp_path, tiny_model_dir, reward_body, informative):
    """DAPO's dynamic sampling through the real CLI: draws are logged; when every group is flat, all
    algorithm.max_draws draws are made and the batch is topped up with flat groups (the step still trains on a
    full batch); when some groups differ, a batch made within the cap holds no flat group. (With Dr. GRPO's
    no-std baseline and a per-response token-sum loss, so that those run end to end too.)"""
    env = _reward_module(tmp_path, reward_body)
    out = tmp_path / "rl"
    proc = run_cli("rl", "algorithm.dynamic_sampling=true", "algorithm.max_draws=3", f"policy.path={tiny_model_dir}",
                   "algorithm.baseline=group_mean", "algorithm.loss_agg=seq-mean-token-sum",  # Dr. GRPO's baseline too
                   f"output_dir={out}", "max_steps=2", "reward.functions=[myrewards:score]", "rollout.max_new_tokens=6",
                   *SMALL, "data.num_eval=2", "eval.max_new_tokens=4", "device=cpu", "device.threads=1",
                   cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    train = [r for r in metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 1 <= r["sampling_draws"] <= 3
        if not informative:
            assert r["sampling_draws"] == 3 and r["sampling_topped_up_groups"] == 4 and r["zero_signal_group_frac"] == 1
        elif r["sampling_draws"] < 3:
            assert r["sampling_topped_up_groups"] == 0 and r["zero_signal_group_frac"] == 0
        # the groups topped up are exactly the flat ones left in the batch
        assert r["zero_signal_group_frac"] == pytest.approx(r["sampling_topped_up_groups"] / 4)
    if informative:
        assert any(r["sampling_draws"] < 3 for r in train)


@pytest.mark.slow  # the default run's time on a 2-core machine (make test-slow runs it; session 18's note)
def test_dynamic_sampling_resumes_bit_identical(tmp_path, tiny_model_dir):
    """Dynamic sampling is the default with rule rewards alone: a run stopped after step 2 and resumed ends with
    the weights of the straight run, its redraws included (the prompt stream's position and each draw's noise).
    Each response is scored once: the reward function runs 16 times a draw (4 prompts x 4 samples), not again
    for the groups the step keeps."""
    env = _reward_module(tmp_path, "import os\n"
                                   "def score(prompt, response, **row):\n"
                                   "    with open(os.environ['CALLS'], 'a') as f:\n"
                                   "        f.write('1')\n"
                                   "    return float(len(response) % 2)\n")
    env["CALLS"] = str(tmp_path / "calls")
    common = [f"policy.path={tiny_model_dir}", "reward.functions=[myrewards:score]", "algorithm.max_draws=3",
              "rollout.max_new_tokens=6", "checkpoint.every=2", *SMALL, "data.num_eval=2", "eval.max_new_tokens=4",
              "device=cpu", "device.threads=1"]
    straight = run_cli("rl", f"output_dir={tmp_path / 'a'}", "max_steps=4", *common, cwd=tmp_path, env=env)
    assert straight.returncode == 0, straight.stderr
    assert "rl: algorithm.dynamic_sampling true" in straight.stdout + straight.stderr  # the default, said
    calls = len((tmp_path / "calls").read_text())
    assert calls == 16 * sum(r["sampling_draws"] for r in metrics(tmp_path / "a") if r["kind"] == "train")
    for steps in (2, 4):
        proc = run_cli("rl", f"output_dir={tmp_path / 'b'}", f"max_steps={steps}", *common, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
    train = [r for r in metrics(tmp_path / "a") if r["kind"] == "train"]
    for r in train:  # a batch made within the cap holds no flat group; the topped-up groups are the flat ones left
        assert 1 <= r["sampling_draws"] <= 3
        if r["sampling_draws"] < 3:
            assert r["sampling_topped_up_groups"] == 0 and r["zero_signal_group_frac"] == 0
        assert r["zero_signal_group_frac"] == pytest.approx(r["sampling_topped_up_groups"] / 4)
    draws = [r["sampling_draws"] for r in train]
    assert max(draws) > 1 and min(draws) < 3, draws  # some step redrew (a shifted prompt stream to restore)
    assert draws == [r["sampling_draws"] for r in metrics(tmp_path / "b") if r["kind"] == "train"]
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("autocast, source", [("none", "the sampler's"), ("bf16", "a no-grad forward")])
def test_old_log_probs_of_a_split_one_pass_update_come_from_the_sampler_in_fp32_only(tmp_path, tiny_model_dir,
                                                                                    autocast, source):
    """A one-pass update over several micro-batches takes the sampler's log-probs as the old ones in fp32 (they
    agree with a forward to ~1e-5 a token); under bf16, decoding and a whole forward disagree (0.03 a token on
    SmolLM2), so a no-grad forward gives them, computed as the reference's are: the first step's KL is exactly 0."""
    proc = run_cli("rl", f"policy.path={tiny_model_dir}", "output_dir=out", "max_steps=1", "micro_batch_tokens=140",
                   f"device.autocast={autocast}", "algorithm.dynamic_sampling=false", *SMALL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr
    assert f"old log-probs: the update's own forward in one micro-batch, else {source}" in said
    first = next(r for r in metrics(tmp_path / "out") if r.get("kind", "train") == "train")
    assert first["kl"] == 0.0 if autocast == "bf16" else abs(first["kl"]) < 1e-4


ENGINE_PLUGIN = '''
import json, os
from rlhf_cli.engines.rollout import LocalEngine


class CountingEngine(LocalEngine):
    """The local engine, counting the rows it samples into a file: a user's engine, one file."""

    def generate(self, prompt_ids, prompt_mask, params):
        out = super().generate(prompt_ids, prompt_mask, params)
        path = os.environ["ENGINE_LOG"]
        rows = json.load(open(path)) if os.path.exists(path) else []
        json.dump(rows + [int(prompt_ids.shape[0])], open(path, "w"))
        return out


class NotAnEngine:
    pass
'''


@pytest.mark.slow  # the default run's time on a 2-core machine (make test-slow runs it; session 18's note)
def test_a_rollout_engine_of_ones_own_is_one_file_named_by_dotted_path(tmp_path, tiny_model_dir):
    """rollout.engine=module:Class runs the user's engine class (here the local one, counting what it samples)
    with no edit to the package; a class that is no engine, or a module that is not there, is one error line."""
    (tmp_path / "myengine.py").write_text(ENGINE_PLUGIN)
    env = {"PYTHONPATH": str(tmp_path), "ENGINE_LOG": str(tmp_path / "rows.json")}
    common = [f"policy.path={tiny_model_dir}", "max_steps=1", "rollout.max_new_tokens=4", *SMALL, "data.num_eval=2",
              "eval.max_new_tokens=4"]
    proc = run_cli("rl", "rollout.engine=myengine:CountingEngine", "output_dir=out", *common, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    sampled = json.loads((tmp_path / "rows.json").read_text())
    assert sampled[0] == sampled[-1] == 2 and 16 in sampled  # the 2 held-out prompts before and after; 4 x 4 rows a draw
    assert (tmp_path / "out" / "final" / "manifest.json").exists()
    bad = run_cli("rl", "rollout.engine=myengine:NotAnEngine", "output_dir=bad", *common, cwd=tmp_path, env=env)
    assert_one_line_error(bad, "rollout.engine=myengine:NotAnEngine is not an engine class")
    missing = run_cli("rl", "rollout.engine=nomodule:Engine", "output_dir=bad2", *common, cwd=tmp_path, env=env)
    assert_one_line_error(missing, "cannot import module 'nomodule'")
    checked = run_cli("validate", "rl", "rollout.engine=myengine:NotAnEngine", *common, cwd=tmp_path, env=env)
    assert_one_line_error(checked, "rollout.engine=myengine:NotAnEngine is not an engine class")  # before any run
