"""Multi-turn environments (issue 30): the interface, token-in-token-out episodes, and failures that end an
episode, never the run. RL over episodes end to end: tests/stages/test_rl_envs.py."""

from __future__ import annotations

import time

import pytest
import torch
from layouts import build_layout

from rlhf_cli.data import apply_template, encode_prompt
from rlhf_cli.engines.episodes import run_episodes, turn_ids
from rlhf_cli.engines.rollout import SamplingParams, make_engine
from rlhf_cli.envs import EnvFailure, Step, as_step, call, env_class
from rlhf_cli.envs import base as env_base
from rlhf_cli.envs.__main__ import TASKS
from rlhf_cli.errors import UserError
from rlhf_cli.models import load_causal_lm, load_tokenizer
from rlhf_cli.models.logprobs import Support, response_logprobs

OPENING = [{"role": "user", "content": "Start at 4. add 2."}]
PLAIN = "Start at 4. add 2. sub 3. add 1.\n"  # the embedded task's prompt: its SFT model (sft_run) stops after it


# ---------------------------------------------------------------- the interface
@pytest.mark.parametrize("name, fragment", [
    ("nosuchmodule_xyz:Env", "cannot import module 'nosuchmodule_xyz'"),
    ("rlhf_cli.envs.modsteps:problem", "is not an environment class"),  # a function, not a class
    ("rlhf_cli.envs.base:EnvTask", "is not an environment class"),  # a class without reset / step
    ("rlhf_cli.envs.modsteps", "is not 'module:Class'"),
])
def test_a_name_that_is_no_environment_class_is_one_error_naming_it(name, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        env_class(name)


def test_a_step_is_a_step_or_a_tuple_and_anything_else_fails_the_episode():
    assert as_step(([], 1, True)) == Step([], 1, True)
    assert as_step(([{"role": "user", "content": "x"}], 0.5, False, None)).messages[0]["content"] == "x"
    for bad, fragment in [(None, "expected Step"), ({"reward": 1}, "expected Step"),
                          (Step("text", 0.0, False), "list of {role, content}"),
                          (Step([{"role": "user"}], 0.0, False), "list of {role, content}"),
                          (Step([], "1", False), "reward '1'"), (Step([], float("nan"), False), "reward nan"),
                          (Step([], 1.0, "yes"), "expected bools"), (([], 1.0), "expected Step")]:
        with pytest.raises(EnvFailure, match=fragment.replace("{", r"\{").replace("}", r"\}")):
            as_step(bad)


def test_a_call_that_raises_or_hangs_is_an_env_failure_within_the_time_limit():
    with pytest.raises(EnvFailure, match="step raised ZeroDivisionError"):
        call(lambda: 1 / 0, (), 1.0, "step")
    t0 = time.perf_counter()
    with pytest.raises(EnvFailure, match="ran past env.timeout_s=0.2"):
        call(time.sleep, (30,), 0.2, "step")
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_shipped_environment_is_solved_by_its_gold_policy_and_less_often_by_its_demonstrator(name):
    task = TASKS[name]
    held = env_base.rows(task)["prompts_eval"]
    gold = [env_base.play(task, row, task.gold)[1].solved for row in held]
    rng = __import__("random").Random(1)
    demo = [env_base.play(task, row, lambda r, m: task.demo(r, m, rng))[1].solved for row in held]
    assert all(gold), name
    assert sum(bool(s) for s in demo) <= 0.8 * len(held), name  # room for RL


def test_held_out_rows_never_appear_in_the_training_files():
    import json

    for task in TASKS.values():
        files = env_base.rows(task)
        held = {json.dumps(r, sort_keys=True) for r in files["prompts_eval"]}
        assert not held & {json.dumps(r, sort_keys=True) for r in files["prompts_train"]}
        assert len(held) == task.n_eval


# ---------------------------------------------------------------- the chat template renders each appended turn
@pytest.mark.parametrize("layout", ["tiny", "qwen2.5", "llama3", "gemma", "smollm2"])
def test_appended_turn_ids_continue_the_conversation_as_the_template_renders_it(layout, tmp_path, tiny_model_dir):
    if layout == "tiny":
        path = tiny_model_dir
    elif layout == "smollm2":
        from pretrained import smollm2_dir

        path = smollm2_dir()
    else:
        path = build_layout(layout, tmp_path / layout)
    tokenizer = load_tokenizer(path, "policy.path")
    reply = [{"role": "user", "content": "sub 3."}]
    stop = tokenizer.convert_tokens_to_ids({"qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>",
                                            "gemma": "<end_of_turn>"}.get(layout, tokenizer.eos_token))
    # what an episode holds: the prompt, the assistant's sampled ids and its stop token, then the appended turn
    prompt = encode_prompt(tokenizer, apply_template(tokenizer, OPENING, add_generation_prompt=True))
    sampled = tokenizer("4+2=6", add_special_tokens=False)["input_ids"] + [stop]
    context = prompt + sampled + turn_ids(tokenizer, reply)
    rendered = apply_template(tokenizer, OPENING + [{"role": "assistant", "content": "4+2=6"}] + reply,
                              add_generation_prompt=True)
    assert tokenizer.decode(context) == tokenizer.decode(encode_prompt(tokenizer, rendered))


# ---------------------------------------------------------------- episodes on the rollout engines
class Echo:
    """Answers every turn with the next of three operations, whatever the assistant said; never done."""
    max_turns = 3

    def reset(self, row):
        self.turn = 0
        return OPENING

    def step(self, text):
        self.turn += 1
        return Step([{"role": "user", "content": ["sub 3.", "add 1."][self.turn % 2]}], 0.25 * self.turn, False)


@pytest.mark.parametrize("decoder", ["lean", "hf"])
def test_episodes_train_the_sampled_ids_and_their_log_probs_are_the_policys_at_every_turn(sft_run, decoder):
    path = sft_run / "final"
    tokenizer = load_tokenizer(path, "policy.path")
    model = load_causal_lm(path, "policy.path", "fp32", torch.device("cpu"))
    engine = make_engine(decoder, model, tokenizer)
    prompt = encode_prompt(tokenizer, PLAIN)
    rows = [{"i": i} for i in range(8)]
    rollout = run_episodes(engine, tokenizer, Echo, rows, [prompt] * 8,
                           SamplingParams(40, temperature=1.0, noise_key=(0, 0, 0)), 3, 160, 5.0)
    appended = [turn_ids(tokenizer, [{"role": "user", "content": c}]) for c in ("add 1.", "sub 3.")]
    multi = 0
    for b, episode in enumerate(rollout.episodes):
        ids = rollout.response_ids[b].tolist()
        multi += len(episode.turns) > 1
        stepped = len(episode.turns) - (episode.end == "no_stop")  # a turn cut at the length limit: no step
        assert episode.rewards == [0.25 * (t + 1) for t in range(stepped)] + [0.0] * (len(episode.turns) - stepped)
        for k, (start, end) in enumerate(episode.turns):
            assert rollout.response_mask[b, start:end].eq(1).all()  # the assistant's ids: trained
            if k + 1 < len(episode.turns):  # then the environment's, as the template renders them: context only
                gap = ids[end:episode.turns[k + 1][0]]
                assert gap == appended[k % 2] and not rollout.response_mask[b, end:end + len(gap)].any()
                assert rollout.context_mask[b, end:end + len(gap)].eq(1).all()
        assert episode.end in ("max_turns", "no_stop", "context") and rollout.context_mask[b].sum() >= rollout.response_mask[b].sum()
    assert multi >= 4  # most episodes went past their first turn
    # a forward of the whole episodes (environment tokens as context) gives the sampler's log-probs on every
    # assistant token of every turn: the ids trained are the ids sampled
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        forward = response_logprobs(model, rollout.input_ids, rollout.attention_mask, P, 1.0,
                                    support=Support(engine.vocab_limit, tuple(engine.never or ())))
    mask = rollout.response_mask.bool()
    assert torch.allclose(forward[mask], rollout.logprobs[mask], atol=2e-4)
    assert not rollout.logprobs[~mask].any()


def test_a_failing_environment_ends_its_episode_with_the_reason_kept(sft_run):
    class Flaky(Echo):
        def step(self, text):
            if self.turn == 1:
                raise RuntimeError("tool down")
            return super().step(text)

    path = sft_run / "final"
    tokenizer = load_tokenizer(path, "policy.path")
    model = load_causal_lm(path, "policy.path", "fp32", torch.device("cpu"))
    rollout = run_episodes(make_engine("auto", model, tokenizer), tokenizer, Flaky, [{}] * 4,
                           [encode_prompt(tokenizer, PLAIN)] * 4, SamplingParams(40, greedy=True), 3, 160, 5.0)
    for episode in rollout.episodes:  # greedy: the same episode four times
        assert len(episode.turns) == 2 and episode.end == "env_error: step raised RuntimeError: tool down"
        assert episode.rewards == [0.25, 0.0]


class OneWord:
    """Asks a one-word question a turn: a chat model stops after each answer."""
    max_turns = 3

    def reset(self, row):
        return [{"role": "user", "content": "Answer with one word: is the sky blue?"}]

    def step(self, text):
        return Step([{"role": "user", "content": "And is grass green? One word."}], 0.0, False)


def test_episodes_on_the_real_checkpoint_train_what_they_sampled():
    """SmolLM2-135M-Instruct over three turns, the questions rendered by its ChatML template: the sampler's
    log-probs (greedy: of the argmax, at temperature 1) are a forward's on every assistant token of every turn."""
    from pretrained import smollm2_dir

    path = smollm2_dir()
    tokenizer = load_tokenizer(path, "policy.path")
    model = load_causal_lm(path, "policy.path", "fp32", torch.device("cpu"))
    engine = make_engine("auto", model, tokenizer)
    prompt = encode_prompt(tokenizer, apply_template(tokenizer, OneWord().reset({}), add_generation_prompt=True))
    rollout = run_episodes(engine, tokenizer, OneWord, [{}], [prompt], SamplingParams(16, greedy=True), 3, 512, 5.0)
    episode = rollout.episodes[0]
    assert len(episode.turns) == 3 and episode.end == "max_turns", episode.summary()
    context = rollout.input_ids[0][rollout.attention_mask[0].bool()].tolist()
    assert tokenizer.decode(context).count("<|im_start|>user\nAnd is grass green? One word.<|im_end|>") == 2
    with torch.no_grad():
        forward = response_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_ids.shape[1], 1.0,
                                    support=Support(engine.vocab_limit, tuple(engine.never or ())))
    mask = rollout.response_mask.bool()
    assert torch.allclose(forward[mask], rollout.logprobs[mask], atol=1e-3)
