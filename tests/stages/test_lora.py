"""LoRA through peft in every stage, end to end on the tiny model: adapter and merged finals
load with peft / plain transformers and compute what the run computed; a LoRA checkpoint holds
the adapters only and resumes to identical weights; in rl the reference is the policy with its
adapters off (KL exactly 0 before the first update, no second copy of the weights in memory);
a bad LoRA config is one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_one_line_error, run_cli
from helpers import LORA_ADAPTERS as LORA, LORA_QUICK as QUICK, ONE_THREAD
from rlhf_cli import data
from rlhf_cli.commands.compose import compose_config
from rlhf_cli.config import DeviceConfig, LoRAConfig, SFTConfig
from rlhf_cli.engines.rollout import make_engine
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import load_causal_lm, load_scalar_head_model, load_tokenizer
from rlhf_cli.stages.sft import eval_loss
from rlhf_cli.stages.train_rm import Scorer, evaluate_pairs, tokenize_pairs
from rlhf_cli.training.evaluation import held_out_accuracy



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The runs' thread count in this process too: the same summation order as the runs, and no idle spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest(run_dir):
    return json.loads((run_dir / "final" / "manifest.json").read_text())


def train_steps(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory):
    """The same 6-step LoRA sft twice, final/ as an adapter and merged (lora.save shapes final/ only)."""
    root = tmp_path_factory.mktemp("lora_sft")
    for save in ("adapter", "merged"):
        proc = run_cli("sft", f"output_dir={root / save}", "max_steps=6", *QUICK, *LORA, f"lora.save={save}", cwd=root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _held_out(overrides):
    """The composed config and held-out rows of a run with these overrides."""
    cfg = compose_config("sft", overrides)
    _, eval_rows = data.stage_rows(cfg.data, "sft", cfg.seed)
    return cfg, eval_rows


def test_sft_adapter_final_loads_with_peft_and_computes_what_the_run_did(sft_lora):
    from peft import AutoPeftModelForCausalLM

    final = sft_lora / "adapter" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "manifest.json"} <= {
        p.name for p in final.iterdir()}
    assert not (final / "config.json").exists() and not (final / "model.safetensors").exists()
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((sft_lora / "adapter" / "base").resolve())  # the embedded base the run trained on
    info = manifest(sft_lora / "adapter")
    assert 0 < info["parameters"]["trainable"] < 0.1 * info["parameters"]["total"]
    adapter = load_file(final / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter) and sum(t.numel() for t in adapter.values()) == info["parameters"]["trainable"]

    model = AutoPeftModelForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(str(final), "final")
    cfg, eval_rows = _held_out(QUICK + LORA)
    examples, _ = data.tokenize_sft(tok, eval_rows, cfg.model.max_length, "data.eval")
    # the held-out loss the run logged at its last step, recomputed by the model peft loaded
    assert eval_loss(model, examples, cfg, tok.pad_token_id, "cpu", tokens=4096) == pytest.approx(info["metrics"]["eval_loss"], rel=1e-5)
    prompts = [data.split_sft_row(tok, r, i, "data.eval")[0] for i, r in enumerate(eval_rows)]
    accuracy, _, mean_chars, texts = held_out_accuracy(make_engine("auto", model, tok), tok, eval_rows, prompts, cfg.eval, "cpu")
    assert mean_chars == info["metrics"]["eval_response_chars"] and accuracy == info["metrics"]["eval_accuracy"]
    # an adapter dir is a model path everywhere: our loader merges it into its base, same greedy texts
    merged = load_causal_lm(str(final), "model.path")
    assert all(p.requires_grad for p in merged.parameters())  # trainable again after peft's freezing
    assert held_out_accuracy(make_engine("auto", merged, tok), tok, eval_rows, prompts, cfg.eval, "cpu")[3] == texts


def test_sft_merged_final_loads_with_plain_transformers_and_matches_the_adapter(sft_lora):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    final = sft_lora / "merged" / "final"
    assert (final / "config.json").exists() and not (final / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    assert not any("lora" in k for k in merged.state_dict())
    adapter = AutoPeftModelForCausalLM.from_pretrained(sft_lora / "adapter" / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(sft_lora / "merged" / "base").eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(input_ids=ids).logits for m in (merged, adapter, base))
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)  # same training, only final/ differs
    assert (merged_logits - base_logits).abs().max() > 1e-2  # and the adapters did train
    assert manifest(sft_lora / "merged")["metrics"] == pytest.approx(manifest(sft_lora / "adapter")["metrics"])


def test_lora_sft_checkpoints_hold_adapters_and_resume_to_identical_weights(sft_lora, tmp_path):
    """A run stopped right after its step-3 checkpoint (a copy of what the 6-step run left then) resumes to the
    6-step run's exact adapter weights and losses."""
    straight, stopped = sft_lora / "adapter", tmp_path / "resumed"
    ckpt = straight / "checkpoints" / "step-000003"
    saved = load_file(ckpt / "model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the frozen base is reloaded from model.path, not saved
    assert sum(t.numel() for t in saved.values()) == manifest(straight)["parameters"]["trainable"]
    stopped.mkdir()
    shutil.copytree(straight / "base", stopped / "base")  # the embedded base model
    shutil.copy(straight / "metrics.jsonl", stopped / "metrics.jsonl")  # steps after 3 are dropped on resume
    config = json.loads((straight / "config.json").read_text())
    (stopped / "config.json").write_text(json.dumps({**config, "output_dir": str(stopped)}))
    shutil.copytree(ckpt, stopped / "checkpoints" / ckpt.name)
    proc = run_cli("sft", f"output_dir={stopped}", "max_steps=6", *QUICK, *LORA, "lora.save=adapter", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming at step 3" in proc.stdout + proc.stderr
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(stopped / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in train_steps(stopped)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train_steps(stopped)] == [r["loss"] for r in train_steps(straight)]


@pytest.fixture(scope="module")
def rm_lora(sft_lora, tmp_path_factory):
    """A LoRA reward model over the sft adapter final (merged on loading), saved as an adapter."""
    root = tmp_path_factory.mktemp("lora_rm")
    proc = run_cli("train-rm", f"output_dir={root / 'rm'}", f"model.path={sft_lora / 'adapter' / 'final'}", "max_steps=3",
                   "data.num_train=64", "data.num_eval=16", "batch_size=8", "eval.every=1000", "optim.lr=2e-2",
                   *LORA, "lora.save=adapter", *ONE_THREAD, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "rm"


def test_lora_reward_model_adapter_trains_its_head_and_scores_as_in_the_run(rm_lora, sft_lora):
    from peft import AutoPeftModelForSequenceClassification

    final = rm_lora / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    # the parent was itself an adapter: the merged parent became this adapter's base
    assert config["base_model_name_or_path"] == str((rm_lora / "base").resolve())
    assert any(k.startswith("base_model.model.score") for k in load_file(final / "adapter_model.safetensors"))
    info = manifest(rm_lora)
    tok = load_tokenizer(str(final), "final")
    cfg = compose_config("train-rm", ["data.num_train=64", "data.num_eval=16"])
    _, eval_rows = data.stage_rows(cfg.data, "pairs", cfg.seed)
    pairs, _ = tokenize_pairs(tok, eval_rows, cfg.model.max_length, "data.eval", True)
    for model in (load_scalar_head_model(str(final), "reward.model.path"),  # our loader: merged
                  AutoPeftModelForSequenceClassification.from_pretrained(final).get_base_model()):
        stats = evaluate_pairs(Scorer(model.eval()), pairs, cfg.eval.batch_size, tok.pad_token_id, "cpu")
        assert stats["eval_score_mean"] == pytest.approx(info["metrics"]["eval_score_mean"], rel=1e-4, abs=1e-6)
        assert stats["eval_accuracy"] == info["metrics"]["eval_accuracy"]
    assert info["metrics"]["eval_score_std"] > 0  # the zero-initialised head trained


def test_lora_rl_reference_is_the_policy_with_adapters_off(sft_lora, rm_lora, tmp_path):
    from peft import AutoPeftModelForCausalLM

    sft_final = sft_lora / "adapter" / "final"
    out = tmp_path / "rl"
    proc = run_cli("rl", f"policy.path={sft_final}", f"reward.model.path={rm_lora / 'final'}", f"output_dir={out}",
                   "max_steps=2", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=12",
                   "eval.every=1000", "eval.max_new_tokens=12", "data.num_eval=20", "data.num_train=200", "log_every=1",
                   "optim.lr=2e-2", *LORA, "lora.save=adapter", *ONE_THREAD, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = train_steps(out)
    assert train[0]["kl"] == 0.0  # B = 0 at the start: pi == pi_ref bit for bit
    assert train[-1]["kl"] != 0.0  # after one update the adapters moved the policy away from the reference

    # memory: every parameter storage of every model the stage built, counted once
    held = manifest(out)["parameters_held"]
    sft_merged = load_causal_lm(str(sft_final), "policy.path")
    n_policy = sum(p.numel() for p in sft_merged.parameters())
    n_rm = sum(p.numel() for p in load_scalar_head_model(str(rm_lora / "final"), "rm").parameters())
    assert held["reference"] == 0  # no separate reference model was loaded
    assert held["policy"] == n_policy + held["trainable"] and held["reward_model"] == n_rm
    assert held["total"] == n_policy + held["trainable"] + n_rm < 2 * n_policy + n_rm  # less than two policy copies
    assert held["trainable"] < 0.1 * n_policy

    # final/: an adapter over the merged sft policy (written to <run>/base), loadable with peft
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    base = load_file(out / "base" / "model.safetensors")
    assert all(torch.equal(base[k], v) for k, v in sft_merged.state_dict().items() if k in base)
    policy = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, sft_merged(input_ids=ids).logits)
        with policy.disable_adapter():  # adapters off = the sft policy = the reference it trained against
            assert torch.allclose(policy(input_ids=ids).logits, sft_merged(input_ids=ids).logits, atol=1e-5)


@pytest.mark.slow  # ~75 s of CPU: out of the default run (make test-slow runs it)
def test_lora_dpo_reference_is_the_base_and_the_adapter_final_computes_the_runs_rewards(sft_lora, tmp_path):
    """dpo with adapters: the kept reference log-probs are the adapter sft policy's own (adapters at B = 0 add
    nothing), the first step's loss is log 2, and the final adapter, loaded with peft, ranks the held-out pairs
    with the margin the run reported."""
    from peft import AutoPeftModelForCausalLM

    from rlhf_cli.models import stop_token_ids
    from rlhf_cli.stages.dpo import REFERENCE_FILE, pair_logprobs

    sft_final = sft_lora / "adapter" / "final"
    out = tmp_path / "dpo"
    proc = run_cli("dpo", f"model.path={sft_final}", f"output_dir={out}", "max_steps=3", *QUICK, *LORA,
                   "lora.save=adapter", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert train_steps(out)[0]["pref_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    tok = load_tokenizer(str(out / "final"), "model.path")
    cfg = compose_config("dpo", [f"model.path={sft_final}", *QUICK])
    _, eval_rows = data.stage_rows(cfg.data, "pairs", cfg.seed)
    pairs, _ = data.tokenize_preference(tok, eval_rows, cfg.model.max_length, "data.eval",
                                        stop_token_ids(tok, str(out / "base")))
    policy = AutoPeftModelForCausalLM.from_pretrained(out / "final").eval()
    kept = load_file(out / REFERENCE_FILE)
    with torch.no_grad():
        with policy.disable_adapter():  # the starting policy: the reference the run trained against
            ref = pair_logprobs(policy, pairs, tok.pad_token_id, "cpu")
        now = pair_logprobs(policy, pairs, tok.pad_token_id, "cpu")
    torch.testing.assert_close(ref.chosen, kept["eval_chosen"], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref.rejected, kept["eval_rejected"], atol=1e-4, rtol=1e-5)
    margin = 0.1 * ((now.chosen - ref.chosen) - (now.rejected - ref.rejected))
    assert float(margin.abs().max()) > 1e-4  # the adapters moved
    assert manifest(out)["metrics"]["eval_margin"] == pytest.approx(float(margin.mean()), abs=1e-5)


@pytest.mark.parametrize("overrides,fragment", [
    (["lora.r=-1"], "lora.r must be >= 0"),
    (["lora.r=4", "lora.target_modules=[q_proj,nosuch_proj]"], "lora.target_modules"),
])
def test_bad_lora_config_is_one_line(tmp_path, tiny_model_dir, overrides, fragment):
    proc = run_cli("sft", f"model.path={tiny_model_dir}", "output_dir=out", "max_steps=1", *overrides, *ONE_THREAD,
                   cwd=tmp_path)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "out" / "final").exists()


def test_lora_config_checks():
    with pytest.raises(ConfigError, match="lora.save"):
        LoRAConfig(save="full")
    with pytest.raises(ConfigError, match="all-linear stands alone"):
        LoRAConfig(target_modules=["all-linear", "q_proj"])
    with pytest.raises(ConfigError, match="fsdp"):
        SFTConfig(lora=LoRAConfig(r=4), device=DeviceConfig(distributed="fsdp"))
    with pytest.raises(ConfigError, match="placement.reference"):
        compose_config("rl", ["lora.r=4", "placement.reference=cpu", "placement.policy=cuda"])
    assert compose_config("sft", ["lora.r=8", "lora.target_modules=[q_proj,v_proj]"]).lora.target_modules == ["q_proj", "v_proj"]
