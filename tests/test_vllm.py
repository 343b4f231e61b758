"""rollout.engine=vllm (issue 19): the engine against the lean one and the training model, and RL runs with it.

    make test-vllm          # these tests, in .venv-vllm (make install-vllm); skipped, saying why, without vLLM

Out of the default run (marker `vllm`). vLLM's CPU backend has attention kernels for head sizes 32, 64, ...
only, so the model here is the embedded tiny Llama with 2 heads of 32 (the same weight shapes as the
default's 4 heads of 16). Tolerance of the log-prob comparison: 1e-4 per token in fp32 (measured: 5e-7).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from helpers import read_metrics

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vLLM is not installed: make test-vllm runs these in .venv-vllm")]

LOGPROB_TOLERANCE = 1e-4
HEAD32 = {"num_attention_heads": 2, "num_key_value_heads": 2}
ONE_THREAD = ["device=cpu", "device.threads=1"]
VLLM = ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.2"]
RL_SHORT = ["rollout.prompts_per_step=8", "rollout.samples_per_prompt=4", "data.num_eval=40", "log_every=1"]


@pytest.fixture(scope="module")
def base32(tmp_path_factory) -> Path:
    from rlhf_cli.models.embedded import write_embedded_base

    return write_embedded_base(tmp_path_factory.mktemp("vllm") / "base32", seed=0, **HEAD32)


@pytest.fixture(scope="module")
def engines(base32):
    """(model, tokenizer, lean engine, vllm engine): one vLLM engine for the module (~30 s to start)."""
    from rlhf_cli.engines.rollout import make_engine
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(str(base32), "model")
    model = load_causal_lm(str(base32), "model")
    vllm_engine = make_engine("vllm", model, tokenizer, {"gpu_memory_utilization": 0.2, "max_model_len": 256})
    return model, tokenizer, make_engine("lean", model, tokenizer), vllm_engine


def prompts(tokenizer, k: int = 1):
    from rlhf_cli import data, task

    texts = [data.prompt_text(tokenizer, row, i, "data") for i, row in enumerate(task.prompt_rows(6, seed=3))]
    ids, mask = data.left_pad([data.encode_prompt(tokenizer, t) for t in texts for _ in range(k)], tokenizer.pad_token_id)
    return ids, mask


def training_logprobs(model, engine, rollout) -> torch.Tensor:
    from rlhf_cli.models.logprobs import Support, response_logprobs

    with torch.no_grad():
        return response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1], 1.0,
                                 support=Support(engine.vocab_limit, tuple(engine.never or ())))


def max_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a - b).abs() * mask).max())


def test_after_a_weight_push_vllm_samples_as_the_training_model(engines):
    """Weights changed in place: before the push vLLM's log-probs are the old weights'; after it its greedy
    tokens are the lean engine's and its sampled tokens' log-probs are the training model's, to 1e-4."""
    from rlhf_cli.engines.rollout import SamplingParams

    model, tokenizer, lean, vllm_engine = engines
    ids, mask = prompts(tokenizer, k=4)  # 6 prompts x K=4: one request with n=4 each
    sampling = SamplingParams(24, temperature=1.0, noise_key=(0, 0, 0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    stale = vllm_engine.generate(ids, mask, sampling)
    assert max_gap(training_logprobs(model, vllm_engine, stale), stale.logprobs, stale.response_mask) > 1e-2

    vllm_engine.sync_weights(model)
    greedy = SamplingParams(24, greedy=True)
    assert torch.equal(vllm_engine.generate(ids, mask, greedy).response_ids, lean.generate(ids, mask, greedy).response_ids)
    rollout = vllm_engine.generate(ids, mask, sampling)
    assert max_gap(training_logprobs(model, vllm_engine, rollout), rollout.logprobs, rollout.response_mask) < LOGPROB_TOLERANCE
    assert torch.equal(rollout.response_ids, vllm_engine.generate(ids, mask, sampling).response_ids)  # seeded: reruns agree
    group = rollout.response_ids[:4]
    assert len({tuple(r.tolist()) for r in group}) > 1  # the K samples of one prompt differ
    stops = rollout.response_ids[rollout.stopped, :].gather(1, (rollout.response_mask[rollout.stopped].sum(-1).long() - 1)[:, None])
    assert set(stops.flatten().tolist()) <= set(vllm_engine.stop_ids)  # a stopped row ends on its stop token


def test_lora_weights_are_pushed_merged(engines, base32):
    """A peft LoRA policy with non-zero adapters: vLLM samples from W + B A alpha / r (greedy equal to the lean
    engine on the adapted model, log-probs to 1e-4), and the policy keeps its adapters unmerged."""
    from peft import LoraConfig, get_peft_model

    from rlhf_cli.engines.rollout import SamplingParams, make_engine
    from rlhf_cli.models import load_causal_lm

    _, tokenizer, _, vllm_engine = engines
    policy = get_peft_model(load_causal_lm(str(base32), "model"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])).get_base_model()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    vllm_engine.sync_weights(policy)
    ids, mask = prompts(tokenizer)
    greedy = SamplingParams(24, greedy=True)
    assert torch.equal(vllm_engine.generate(ids, mask, greedy).response_ids,
                       make_engine("lean", policy, tokenizer).generate(ids, mask, greedy).response_ids)
    rollout = vllm_engine.generate(ids, mask, SamplingParams(24, noise_key=(0, 1, 0)))
    assert max_gap(training_logprobs(policy, vllm_engine, rollout), rollout.logprobs, rollout.response_mask) < LOGPROB_TOLERANCE
    assert any("lora_B" in n for n, _ in policy.named_parameters())  # still adapters, not merged in place


def test_a_model_vllm_cannot_run_is_one_line_before_its_weights_load(tmp_path):
    """The default embedded model (head_dim 16: no CPU attention kernel) and an architecture vLLM lacks
    (GPT-Neo): exit 2, one error line naming the fix, nothing trained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.models.embedded import build_tokenizer

    proc = run_cli("rl", *VLLM, *ONE_THREAD, "output_dir=run", "max_steps=1", cwd=tmp_path)
    assert_one_line_error(proc, "no attention kernel for head_dim 16")
    assert "rollout.engine=auto" in proc.stdout + proc.stderr and not (tmp_path / "run" / "final").exists()

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model("gpt_neo", vocab_size=len(tokenizer), hidden_size=64, num_layers=2, num_heads=2,
                                  attention_types=[[["global"], 2]], max_position_embeddings=256)
    neo = tmp_path / "neo"
    AutoModelForCausalLM.from_config(config).save_pretrained(neo)
    tokenizer.save_pretrained(neo)
    proc = run_cli("rl", *VLLM, *ONE_THREAD, f"policy.path={neo}", "output_dir=run2", "max_steps=1", cwd=tmp_path)
    assert_one_line_error(proc, "cannot run GPTNeoForCausalLM")


@pytest.fixture(scope="module")
def sft32(base32, tmp_path_factory) -> Path:
    """The embedded task's SFT on the 32-wide-head tiny model at 600 steps (about a minute; the embedded task has
    converged by then, and the default 1500 would add two minutes)."""
    root = tmp_path_factory.mktemp("sft32")
    proc = run_cli("sft", f"model.path={base32}", "output_dir=sft", "max_steps=600", *ONE_THREAD, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "sft" / "final"


def final_accuracy(run: Path) -> tuple[float, float]:
    """(held-out accuracy before RL, after RL) from the run's eval rows."""
    evals = [r for r in read_metrics(run, "eval") if "eval_accuracy" in r]
    return evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]


@pytest.mark.parametrize("steps", [40])
def test_rl_with_vllm_learns_the_embedded_task_like_lean(sft32, tmp_path, steps):
    """The same RL run with rollout.engine=lean and =vllm: both raise held-out accuracy above SFT's; vLLM's
    log-probs stay within 1e-3 of the training model's (rollout_logprob_diff) and the IS weights near 1."""
    results = {}
    for engine in ("lean", "vllm"):
        extra = VLLM if engine == "vllm" else ["rollout.engine=lean"]
        proc = run_cli("rl", f"policy.path={sft32}", f"output_dir={engine}", f"max_steps={steps}", "eval.every=1000",
                       *RL_SHORT, *extra, *ONE_THREAD, cwd=tmp_path, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[engine] = final_accuracy(tmp_path / engine)
    (tmp_path / "accuracies.json").write_text(json.dumps(results))
    print("held-out accuracy (before, after):", results)
    for engine, (before, after) in results.items():
        assert after > before + 0.2, (engine, results)
    train = read_metrics(tmp_path / "vllm", "train")
    assert max(r["rollout_logprob_diff_max"] for r in train) < 1e-3, train[-1]
    assert all(abs(r["is_weight"] - 1) < 1e-3 for r in train)
    assert "rollout_logprob_diff" not in read_metrics(tmp_path / "lean", "train")[-1]  # lean: nothing to compare


def test_rl_with_vllm_lora_resumes(sft32, tmp_path):
    """LoRA with vLLM: 2 steps with a checkpoint each, then a rerun to 4 resumes at step 2; after the adapters
    have moved, vLLM's log-probs still match the training model's (the merged weights were pushed)."""
    args = ["rl", f"policy.path={sft32}", "output_dir=run", "lora.r=4", "lora.alpha=8", "optim.lr=2e-2",
            "checkpoint.every=1", "eval.every=1000", "data.num_eval=8", *RL_SHORT, *VLLM, *ONE_THREAD]
    first = run_cli(*args, "max_steps=2", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli(*args, "max_steps=4", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming at step 2" in second.stdout + second.stderr
    train = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["rollout_logprob_diff_max"] < 1e-3, train[-1]
    assert (tmp_path / "run" / "final" / "manifest.json").exists()


def test_rl_with_vllm_at_the_default_batch_completes(base32, tmp_path):
    """Issue 28: 16 prompts x 8 samples (the defaults, pinned here) are 128 prefills of 33 tokens, 4,224 tokens over
    vLLM's CPU step budget of 4,096; with chunked prefill the last one was split and vLLM's rewind of its seeded CPU
    generator died ("CPU Generator does not use offset"). The step completes and writes final/."""
    proc = run_cli("rl", f"policy.path={base32}", "output_dir=run", "max_steps=1", "rollout.prompts_per_step=16",
                   "rollout.samples_per_prompt=8", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
                   "data.num_eval=8", "log_every=1", *VLLM, *ONE_THREAD, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    train = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1] and train[0]["rollout_logprob_diff_max"] < 1e-3, train
    assert (tmp_path / "run" / "final" / "manifest.json").exists()


def test_rlhf_eval_with_vllm_answers_as_lean(sft32, tmp_path):
    """`rlhf eval engine=vllm`: the same greedy responses, accuracy and pass@k as the local engine (fp32)."""
    results = {}
    for engine in ("lean", "vllm"):
        out = tmp_path / f"{engine}.json"
        proc = run_cli("eval", str(sft32), f"rollout.engine={engine}", "data.num_eval=40", "data.eval_limit=40",
                       "eval.samples=4", *ONE_THREAD, "--json", str(out), cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[engine] = json.loads(out.read_text())
    lean, vllm = results["lean"], results["vllm"]
    assert vllm["metrics"]["accuracy"] == lean["metrics"]["accuracy"]
    assert [g["response"] for g in vllm["generations"]] == [g["response"] for g in lean["generations"]]
    assert 0 <= vllm["metrics"]["pass@4"] <= 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rl_with_vllm_under_torchrun_runs_an_engine_per_rank(sft32, tmp_path, strategy):
    """Two gloo ranks, each with its own vLLM engine (external_launcher), DDP or FSDP2 (whose shards are gathered
    for the push): after step 1's update every rank's engine still samples as its training model, and the run
    ends cleanly (vLLM closes its own process groups at exit, before ours)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RLHF_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                           "-m", "rlhf_cli", "rl", f"policy.path={sft32}", "output_dir=run", "max_steps=2",
                           "rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.1", "optim.lr=1e-3",
                           f"device.distributed={strategy}", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
                           "data.num_eval=8", "eval.every=1000", *ONE_THREAD], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "Invalid process group" not in out, out[-3000:]
    assert "x 2 ranks" in " ".join(out.split())
    train = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2]
    # step 1 moved the policy (0.5 nats of KL to the sft weights vLLM started with, measured): a missed push
    # would show at step 2 as a gap of that order, not under 1e-3 (measured: 1e-6 with DDP and with FSDP2)
    assert train[1]["kl"] > 0.05, train
    assert max(r["rollout_logprob_diff_max"] for r in train) < 1e-3, train


def test_async_actors_with_vllm_are_refused_while_composing():
    """rollout.mode=async generates on the actors with the local engines: vllm there is one line, not a hang."""
    from rlhf_cli.commands import compose
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="rollout.mode=async does not support rollout.engine=vllm yet"):
        compose.compose_all("rl", ["rollout.mode=async", "rollout.engine=vllm"], multirun=False)


class Echo:
    """Answers every turn with the next operation, whatever the assistant said, for three turns."""
    max_turns = 3

    def reset(self, row):
        return [{"role": "user", "content": "x"}]

    def step(self, text):
        from rlhf_cli.envs import Step

        return Step([{"role": "user", "content": "sub 3."}], 0.5, False)


def test_episodes_on_vllm_are_the_lean_engines_and_their_log_probs_the_training_models(sft32):
    """Multi-turn episodes (issue 30) on vLLM: greedy episodes token for token the lean engine's; sampled ones
    with vLLM's log-probs within the tolerance of a forward of the whole episode on every assistant token."""
    from rlhf_cli import data
    from rlhf_cli.engines.episodes import run_episodes
    from rlhf_cli.engines.rollout import SamplingParams, make_engine
    from rlhf_cli.models import load_causal_lm, load_tokenizer

    tokenizer, model = load_tokenizer(str(sft32), "model"), load_causal_lm(str(sft32), "model")
    vllm_engine = make_engine("vllm", model, tokenizer, {"gpu_memory_utilization": 0.2, "max_model_len": 256})
    prompt = [data.encode_prompt(tokenizer, "Start at 4. add 2. sub 3. add 1.\n")] * 4
    greedy = {name: run_episodes(engine, tokenizer, Echo, [{}] * 4, prompt, SamplingParams(40, greedy=True), 3, 160,
                                 5.0)
              for name, engine in (("lean", make_engine("lean", model, tokenizer)), ("vllm", vllm_engine))}
    assert torch.equal(greedy["lean"].response_ids, greedy["vllm"].response_ids)
    assert [e.turns for e in greedy["lean"].episodes] == [e.turns for e in greedy["vllm"].episodes]
    assert max(len(e.turns) for e in greedy["vllm"].episodes) > 1
    sampled = run_episodes(vllm_engine, tokenizer, Echo, [{}] * 4, prompt, SamplingParams(40, noise_key=(0, 0, 0)), 3,
                           160, 5.0)
    assert max_gap(training_logprobs(model, vllm_engine, sampled), sampled.logprobs,
                   sampled.response_mask) < LOGPROB_TOLERANCE
