"""Bad input as one table (issue 6): input -> exit 2, one `error:` line naming the problem, no
traceback, and nothing written that a later run would trust (no final/, no complete checkpoint).

    .venv/bin/pytest -q tests/test_bad_inputs.py

Every case is a real `python -m rlhf_cli` process, a few at a time, forked from a server that imported
torch, transformers and the stages once (tests/forked_cli.py): its own exit code, stdout, stderr, working
directory, environment and file-size limit, without paying ~3 CPU seconds of imports 94 times. This is the one bad-input table of the suite: every kind the issue
lists across the three stages (the eval tool's arguments are in tests/cli/test_tools.py). Column
`before_run`: refused while composing (no run directory at all) or by the stage (run directory made);
every row: exit 2, one line, no final/, no complete checkpoint, no half-written debris.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import assert_one_line_error
from forked_cli import Launch
from helpers import BAD_INPUT_SFT as SFT, BAD_INPUT_RM as RM, BAD_INPUT_RL as RL
from helpers import write_jsonl as jsonl
from helpers import write_text as write
from rlhf_cli import task

BASE = {"sft": SFT, "train-rm": RM, "rl": RL}
MODEL_KEY = {"sft": "model.path", "train-rm": "model.path", "rl": "policy.path"}


@dataclass
class Case:
    stage: str
    args: Callable[[Path, Path], list[str]]  # (case dir, tiny model dir) -> overrides
    fragment: str  # must appear in the one error line
    rlimit_fsize: int | None = None  # bytes: writes past it fail with EFBIG, as on a full disk
    marker: str | None = None  # a file that must NOT exist afterwards (code that must not have run)
    extra: list[str] = field(default_factory=list)
    before_run: bool = True  # refused while composing the config: not even the run directory is made (False:
    #                          refused by the stage, after the run directory exists: no final/, no complete checkpoint)
    validate: bool = False  # run as `rlhf validate <stage> ...` (never makes a run directory)
    env: dict = field(default_factory=dict)  # environment on top of the test's (WORLD_SIZE: a torchrun layout)


def copy_model(src: Path, dst: Path, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


def reward_model(src: Path, dst: Path, labels: int = 1) -> Path:
    """A real sequence-classifier layout (what train-rm's final/ holds) made from the tiny causal LM."""
    from rlhf_cli.models import load_scalar_head_model, load_tokenizer

    model = load_scalar_head_model(str(src), "model.path")
    if labels != 1:
        model.config.id2label = {i: f"LABEL_{i}" for i in range(labels)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(dst)
    load_tokenizer(str(src), "model.path").save_pretrained(dst)
    return dst


def finished_run(d: Path, m: Path) -> Path:
    """A run directory's layout, as RunDir and save_final leave it: the run's config.json, checkpoints/, final/."""
    run = d / "sft_run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    write(run / "checkpoints" / "step-000002" / "manifest.json", json.dumps({"step": 2}))
    write(run / "config.json", json.dumps({"output_dir": str(run), "seed": 0, "model": {"path": str(m)}}))
    copy_model(m, run / "final")
    return run


def latin1_jsonl(d: Path, m: Path) -> list[str]:
    """Line 2 written in Latin-1 (an editor's default elsewhere): 'café' as the single byte 0xe9."""
    rows = [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "café", "completion": "b"},
                                                                      ensure_ascii=False)]
    return [f"data.train={write(d / 'l1.jsonl', chr(10).join(rows).encode('latin-1'))}"]


def latin1_csv(d: Path, m: Path) -> list[str]:
    text = "prompt,chosen,rejected\na,b,c\nd,é,f\n"
    return [f"data.train={write(d / 'p.csv', text.encode('latin-1'))}"]


def other_tokenizer(d: Path, m: Path) -> list[str]:
    from rlhf_cli.models.embedded import build_tokenizer

    other = copy_model(m, d / "other_tok")
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(other)
    return [f"reference.path={other}"]


def remote_code(d: Path, m: Path) -> list[str]:
    """A model whose config asks to run its own Python file; trust_remote_code is off by default."""
    model = copy_model(m, d / "remote", weights=False)
    write(model / "evil.py", f"open({str(d / 'code-ran')!r}, 'w').close()\n"
                             "from transformers import LlamaConfig, LlamaForCausalLM\n"
                             "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                             "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    write(model / "config.json", json.dumps(config))
    return [f"model.path={model}"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker


def pickled_weights(d: Path, m: Path) -> list[str]:
    """Weights as a pickle (pytorch_model.bin) carrying code: weights-only loading must refuse it."""
    model = copy_model(m, d / "pickled", weights=False)
    torch.save({"model.embed_tokens.weight": _RunsCode(str(d / "code-ran"))}, model / "pytorch_model.bin")
    return [f"model.path={model}"]


def long_pairs(d: Path, m: Path) -> list[str]:
    rows = [{**r, "chosen": r["chosen"] + " and so on" * 20} for r in task.preference_rows(16)]
    return [f"data.train={jsonl(d / 'long.jsonl', rows)}"]


def other_tokenizer_reward_model(d: Path, m: Path) -> list[str]:
    from rlhf_cli.models.embedded import build_tokenizer

    rm = reward_model(m, d / "rm_other_tok")
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.save_pretrained(rm)
    return ["reward=rule_rm", f"reward.model.path={rm}"]


def margin_on_line(d: Path, m: Path) -> list[str]:
    """A bad margin on line 33 of 40: checked after the 5% hold-out shuffled the rows, it must still be
    named by the file's own line, and as data.train (no data.eval was given)."""
    rows = task.preference_rows(40)
    rows[32] = {**rows[32], "margin": "high"}
    jsonl(d / "pairs.jsonl", rows)
    return ["data.train=pairs.jsonl"]  # relative to the case dir, the command's working directory


def null_content_on_line(d: Path, m: Path) -> list[str]:
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}] * 3
    null = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}]
    return [f"data.train={jsonl(d / 'chat.jsonl', chat + null)}"]


def empty_prompt_on_line(d: Path, m: Path) -> list[str]:
    rows = task.prompt_rows(12)
    rows[8] = {**rows[8], "prompt": ""}
    return [f"data.train={jsonl(d / 'prompts.jsonl', rows)}"]


def malformed_line(d: Path, m: Path) -> list[str]:
    return [f"data.train={write(d / 'bad.jsonl', json.dumps({'prompt': 'a', 'completion': 'b'}) + chr(10) + '{oops' + chr(10))}"]


CASES: dict[str, Case] = {
    # ---- config: typos, types, ranges, choices (fail before anything loads)
    "sft typo": Case("sft", lambda d, m: ["optim.max_bad_step=3"], "did you mean optim.max_bad_steps"),
    "train-rm typo": Case("train-rm", lambda d, m: ["center_cof=0.1"], "did you mean center_coef"),
    "rl typo": Case("rl", lambda d, m: ["rollout.temprature=0.5"], "did you mean rollout.temperature"),
    "sft appended unknown key": Case("sft", lambda d, m: ["+optim.lrr=1"], "did you mean optim.lr"),
    "rl appended unknown key": Case("rl", lambda d, m: ["+foo=1"], "unknown config key 'foo'"),
    "sft hydra run dir not creatable": Case("sft", lambda d, m: ["hydra.run.dir=/proc/rlhf-x"],
                                            "could not write the run directory"),
    "rl wrong type": Case("rl", lambda d, m: ["rollout.samples_per_prompt=four"], "rollout.samples_per_prompt"),
    "train-rm wrong type": Case("train-rm", lambda d, m: ["margin_from_data=maybe"], "margin_from_data"),
    "sft max_bad_steps 0": Case("sft", lambda d, m: ["optim.max_bad_steps=0"], "optim.max_bad_steps must be > 0"),
    "train-rm keep_last 0": Case("train-rm", lambda d, m: ["checkpoint.keep_last=0"], "checkpoint.keep_last must be > 0"),
    "rl unknown algorithm": Case("rl", lambda d, m: ["algorithm=dqn"], "options in 'algorithm': a2c, ppo, reinforce"),
    "rl bad choice": Case("rl", lambda d, m: ["kl.estimator=k4"], "kl.estimator='k4' is not one of"),
    "rl reward not dotted": Case("rl", lambda d, m: ["reward.functions=[notdotted]"], "is not 'module:function'"),
    "sft invalid yaml file": Case("sft", lambda d, m: [str(write(d / "bad.yaml", "optim: [unclosed\n"))], "is not valid YAML"),
    "sft yaml file missing": Case("sft", lambda d, m: [str(d / "mine.yaml")], "mine.yaml not found"),
    "rl neither key=value nor yaml": Case("rl", lambda d, m: ["ppo"], "is neither key=value nor a .yaml file"),
    "rl negative kl target": Case("rl", lambda d, m: ["kl.target=-1"], "kl.target must be > 0"),
    "train-rm yaml not a mapping": Case("train-rm", lambda d, m: [str(write(d / "list.yaml", "- 1\n- 2\n"))],
                                        "must hold a mapping"),
    # ---- impossible batch arithmetic
    "rl minibatches do not divide": Case("rl", lambda d, m: ["algorithm=ppo", "rollout.prompts_per_step=3",
                                                             "rollout.samples_per_prompt=3", "algorithm.minibatches=2"],
                                         "does not divide the rollout batch of 9"),
    "sft grad_accum 0": Case("sft", lambda d, m: ["optim.grad_accum=0"], "optim.grad_accum must be > 0"),
    "train-rm batch_size 0": Case("train-rm", lambda d, m: ["batch_size=0"], "batch_size must be > 0"),
    # ---- output dir: unwritable, full disk
    "output_dir is a file": Case("sft", lambda d, m: [], "not writable", extra=["output_dir=afile"]),
    "disk full as the run starts": Case("rl", lambda d, m: [], "file too large (disk full", rlimit_fsize=1500, before_run=False),
    "disk full writing the base model": Case("sft", lambda d, m: ["model.path=null"], "file too large (disk full",
                                             rlimit_fsize=8000, before_run=False),
    "disk full during a checkpoint": Case("sft", lambda d, m: [f"model.path={m}", "checkpoint.every=1"],
                                          "could not write checkpoint", rlimit_fsize=1_000_000, before_run=False),
    # ---- data: missing, empty, corrupt, wrong columns, bad values, over-long
    "rl missing file": Case("rl", lambda d, m: [f"data.train={d / 'nope.jsonl'}"], "file not found", before_run=False),
    "train-rm empty list of train files": Case("train-rm", lambda d, m: ["data.train=[]"], "a list must hold file paths"),
    "train-rm missing file in a list": Case("train-rm", lambda d, m: [
        f"data.train=[{jsonl(d / 'p.jsonl', task.preference_rows(8))},{d / 'nope.jsonl'}]"],
        "data.train[1]: file not found", before_run=False),
    "sft empty eval file": Case("sft", lambda d, m: [f"data.train={jsonl(d / 't.jsonl', task.sft_rows(16))}",
                                                     f"data.eval={write(d / 'e.jsonl', '')}"], "has no rows", before_run=False),
    "train-rm corrupt json": Case("train-rm", lambda d, m: [f"data.train={write(d / 'c.json', '{not json')}"],
                                  "c.json line 1 is not valid JSON", before_run=False),
    "sft csv wrong columns": Case("sft", lambda d, m: ["data.train=" + str(write(d / "q.csv", "question,answer\nhi,1\n"))],
                                  "needs prompt/completion or messages", before_run=False),
    "train-rm every pair over-long": Case("train-rm", long_pairs, "none of its", before_run=False),
    # ---- models and tokenizers
    "rl reward model with another tokenizer": Case("rl", other_tokenizer_reward_model,
                                                   "uses a different tokenizer from the policy", before_run=False),
    "rl mismatched tokenizer": Case("rl", other_tokenizer, "uses a different tokenizer from the policy", before_run=False),
    "sft remote code not trusted": Case("sft", remote_code, "contains custom code", marker="code-ran", before_run=False),
    "sft pickled weights refused": Case("sft", pickled_weights, "does not load", marker="code-ran", before_run=False),
    # ---- (formerly tests/cli/test_cli.py) sft config values, data files and model paths
    "sft typo optim.lrr": Case("sft", lambda d, m: ["optim.lrr=1"], "did you mean optim.lr"),
    "sft typo batch_sise": Case("sft", lambda d, m: ["batch_sise=4"], "did you mean batch_size"),
    "sft lr not a number": Case("sft", lambda d, m: ["optim.lr=abc"], "optim.lr"),
    "sft negative lr": Case("sft", lambda d, m: ["optim.lr=-1"], "optim.lr must be > 0"),
    "sft max_steps 0": Case("sft", lambda d, m: ["max_steps=0"], "max_steps must be > 0"),
    "sft unknown dtype": Case("sft", lambda d, m: ["model.dtype=fp8"], "model.dtype"),
    "sft unknown device option": Case("sft", lambda d, m: ["device=tpu"], "device"),
    "sft absent cuda device": Case("sft", lambda d, m: ["device.type=cuda:7"], "cuda", before_run=False),
    "sft betas one value": Case("sft", lambda d, m: ["optim.betas=[0.9]"], "optim.betas"),
    "sft missing file": Case("sft", lambda d, m: [f"data.train={d / 'nope.jsonl'}"], "file not found", before_run=False),
    "sft malformed line": Case("sft", malformed_line, "line 2 is not valid JSON", before_run=False),
    "sft wrong fields": Case("sft", lambda d, m: [f"data.train={jsonl(d / 'f.jsonl', [{'question': 'a', 'answer': 'b'}])}"],
                             "needs prompt/completion or messages", before_run=False),
    "sft empty train file": Case("sft", lambda d, m: [f"data.train={write(d / 'e.jsonl', chr(10))}"], "has no rows", before_run=False),
    "sft unsupported file type": Case("sft", lambda d, m: [f"data.train={write(d / 'x.txt', 'hi')}"],
                                      "unsupported file type .txt", before_run=False),
    "sft model path missing": Case("sft", lambda d, m: [f"model.path={d / 'no_model'}"], "does not exist", before_run=False),
    "sft model path not a model": Case("sft", lambda d, m: [f"model.path={d}"], "not a Hugging Face model directory", before_run=False),
    # ---- (formerly tests/stages/test_rl.py) rl reward sources, algorithm and engine combinations
    "rl no reward source": Case("rl", lambda d, m: ["reward.functions=[]"], "no reward source"),
    "rl reward module missing": Case("rl", lambda d, m: ["reward.functions=[nosuchmodule:f]"],
                                     "cannot import module 'nosuchmodule'", before_run=False),
    "rl reward function missing": Case("rl", lambda d, m: ["reward.functions=[rlhf_cli.task:nosuch]"],
                                       "has no function 'nosuch'", before_run=False),
    "rl rloo with one sample": Case("rl", lambda d, m: ["algorithm.baseline=rloo", "rollout.samples_per_prompt=1"],
                                    "samples_per_prompt >= 2"),
    "rl ppo minibatches 3": Case("rl", lambda d, m: ["algorithm=ppo", "algorithm.minibatches=3"], "does not divide"),
    "rl reinforce two epochs": Case("rl", lambda d, m: ["algorithm=reinforce", "algorithm.epochs=2"], "one pass"),
    "rl unknown critic init": Case("rl", lambda d, m: ["algorithm=ppo", "critic.init=value"],
                                   "critic.init='value' is not one of reward, policy, shared"),
    "rl shared critic with a path": Case("rl", lambda d, m: ["algorithm=ppo", "critic.init=shared", "critic.path=x"],
                                         "critic.path is unused with critic.init=shared"),
    "rl shared critic under fsdp": Case("rl", lambda d, m: ["algorithm=ppo", "critic.init=shared",
                                                            "device.distributed=fsdp"], "critic.init=shared is not supported with"),
    "rl unknown engine": Case("rl", lambda d, m: ["rollout.engine=sglang"],
                              "rollout.engine='sglang' is not one of auto, lean, hf, vllm"),
    # ---- response limits: prompt + response must fit policy.max_length and the model's positions (config.json);
    # the position cases use a copy without weights, so the check provably runs before any weights load
    "rl rollout longer than max_length": Case("rl", lambda d, m: ["rollout.max_new_tokens=100000"],
                                              "rollout.max_new_tokens=100000 leaves no room for a prompt in "
                                              "policy.max_length=160"),
    "rl rollout longer than the positions": Case("rl", lambda d, m: [f"policy.path={copy_model(m, d / 'nw', weights=False)}",
                                                                     "policy.max_length=4096", "rollout.max_new_tokens=300"],
                                                 "rollout.max_new_tokens=300 does not fit the model's 256 positions",
                                                 before_run=False),
    # ---- (issue 18) rollout.mode=async: impossible layouts, refused before torch.distributed starts or any model loads
    # (the two by world size: by the stage, which knows WORLD_SIZE; `rlhf validate` runs on one process)
    "rl async on one process": Case("rl", lambda d, m: ["rollout.mode=async"],
                                    "rollout.mode=async needs 2 or more processes", before_run=False),
    "rl async actors past the world": Case("rl", lambda d, m: ["rollout.mode=async", "rollout.actors=3"],
                                           "rollout.actors=3 leaves no learner rank among the 3 processes: set "
                                           "rollout.actors=2 or less", env={"WORLD_SIZE": "3"}, before_run=False),
    "rl async unknown mode": Case("rl", lambda d, m: ["rollout.mode=asynchronous"],
                                  "rollout.mode='asynchronous' is not one of sync, async"),
    "rl async negative lag": Case("rl", lambda d, m: ["rollout.mode=async", "rollout.max_lag=-1"],
                                  "rollout.max_lag must be >= 0"),
    "rl async lag below the sync period": Case("rl", lambda d, m: ["rollout.mode=async", "rollout.sync_every=4",
                                                                   "rollout.max_lag=2"],
                                               "set rollout.max_lag to at least 3"),
    "rl async zero sync period": Case("rl", lambda d, m: ["rollout.mode=async", "rollout.sync_every=0"],
                                      "rollout.sync_every must be > 0"),
    "rl async with fsdp": Case("rl", lambda d, m: ["rollout.mode=async", "device.distributed=fsdp"],
                               "rollout.mode=async does not support device.distributed=fsdp"),
    "rl lean engine under fsdp": Case("rl", lambda d, m: ["rollout.engine=lean", "device.distributed=fsdp"],
                                      "rollout.engine=lean cannot decode an FSDP-sharded policy"),
    # ---- (issue 16) one decoding path: bytes that are not UTF-8, in the stages and in validate
    "sft jsonl not utf-8": Case("sft", latin1_jsonl, "l1.jsonl line 2 is not valid UTF-8 (byte 0xe9 at column 16); "
                                                     "save the file as UTF-8", before_run=False),
    "validate csv not utf-8": Case("train-rm", latin1_csv, "p.csv line 3 is not valid UTF-8", validate=True),
    # ---- every row's field types, before any model loads, named by the file's own line
    "sft chat content null": Case("sft", null_content_on_line, "chat.jsonl line 4: `messages` message 2 (assistant) has "
                                                               "content null", before_run=False),
    "rl empty prompt": Case("rl", empty_prompt_on_line, "prompts.jsonl line 9: `prompt` is empty", before_run=False),
    "train-rm bad margin after the hold-out": Case("train-rm", margin_on_line, "data.train: pairs.jsonl line 33: has margin 'high'",
                                                   before_run=False),
    "rl seed out of range": Case("rl", lambda d, m: ["seed=18446744073709551616"], "seed=18446744073709551616 is out of range"),
    # ---- the model kind a key needs, from config.json before any weights load; a run dir is not a model
    "sft model.path a reward model": Case("sft", lambda d, m: [f"model.path={reward_model(m, d / 'rm')}"],
                                          "is a reward model", before_run=False),
    "validate rl reward.model.path a causal LM": Case("rl", lambda d, m: ["reward=rule_rm", f"reward.model.path={m}"],
                                                      "is not a reward model", validate=True),
    "rl policy.path a run directory": Case("rl", lambda d, m: [f"policy.path={finished_run(d, m)}"],
                                           "is a run directory, not a model; its trained model is in", before_run=False),
    "validate sft model.path a checkpoint": Case("sft", lambda d, m: [f"model.path={finished_run(d, m) / 'checkpoints' / 'step-000002'}"],
                                                 "is a training checkpoint", validate=True),
    # ---- dataset size and batches
    "sft batch larger than the data": Case("sft", lambda d, m: ["batch_size=32"], "set batch_size=16 or less", before_run=False),
    "validate rl prompts per step larger than the data": Case("rl", lambda d, m: ["rollout.prompts_per_step=16"],
                                                              "set rollout.prompts_per_step=8 or less", validate=True),
    "train-rm one row and nothing to hold out": Case("train-rm", lambda d, m: [f"data.train={jsonl(d / 'one.jsonl', task.preference_rows(1))}"],
                                                  "too few to hold any out for evaluation", before_run=False),
    # ---- messages that mislead
    "rl reward attribute not callable": Case("rl", lambda d, m: ["reward.functions=[rlhf_cli.rewards:RESERVED]"],
                                             "rlhf_cli.rewards:RESERVED is tuple", before_run=False),
    # ---- (issue 20) reasoning-RL options and evaluation by sampling
    "rl unknown loss aggregation": Case("rl", lambda d, m: ["algorithm.loss_agg=seq-mean"],
                                        "algorithm.loss_agg='seq-mean' is not one of token-mean, seq-mean-token-mean"),
    "rl dual clip not above 1": Case("rl", lambda d, m: ["algorithm=ppo", "algorithm.clip_ratio_c=0.8"],
                                     "algorithm.clip_ratio_c=0.8 must be > 1"),
    "rl group_mean with one sample": Case("rl", lambda d, m: ["algorithm.baseline=group_mean",
                                                              "rollout.samples_per_prompt=1"], "samples_per_prompt >= 2"),
    "rl pass_k above eval.samples": Case("rl", lambda d, m: ["eval.samples=2", "eval.pass_k=[1,4]"],
                                         "eval.pass_k=[1, 4] needs every k in [1, eval.samples=2]"),
    "train-rm eval.samples": Case("train-rm", lambda d, m: ["eval.samples=2"], "a reward model generates none"),
    "rl dynamic sampling with one sample": Case("rl", lambda d, m: ["algorithm.dynamic_sampling=true", "algorithm.baseline=mean",
                                                                    "rollout.samples_per_prompt=1"],
                                                "algorithm.dynamic_sampling=true compares the K samples"),
    "rl overlong buffer past the limit": Case("rl", lambda d, m: ["reward.overlong_buffer=50", "rollout.max_new_tokens=40"],
                                              "reward.overlong_buffer=50 is longer than the response limit"),
}

if importlib.util.find_spec("vllm") is None:  # the default install (.venv-vllm has it: tests/test_vllm.py)
    CASES["rl vllm not installed"] = Case("rl", lambda d, m: ["rollout.engine=vllm"],
                                          "rollout.engine=vllm needs vLLM, which is not installed in this Python "
                                          "environment; run `make install-vllm`")


def test_bad_inputs_table(tmp_path, tiny_model_dir):
    assert len(CASES) >= 25 and {c.stage for c in CASES.values()} == {"sft", "train-rm", "rl"}
    env = {**os.environ, "RLHF_NO_PROGRESS": "1"}
    pending, running, results = list(CASES.items()), {}, {}
    while pending or running:
        while pending and len(running) < 6:  # a few at a time: each pays the Python + torch start-up
            name, case = pending.pop(0)
            d = tmp_path / name.replace(" ", "_")
            d.mkdir()
            if name == "output_dir is a file":
                write(d / "afile", "x")
            args = case.args(d, tiny_model_dir)
            key = MODEL_KEY[case.stage]
            model = [] if any(a.startswith(key + "=") for a in args) else [f"{key}={tiny_model_dir}"]
            out = case.extra or ["output_dir=out"]
            command = ["validate", case.stage] if case.validate else [case.stage]
            io = tmp_path / ".io" / name.replace(" ", "_")
            io.mkdir(parents=True)
            running[name] = (d, Launch([*command, *BASE[case.stage], *model, *out, *args], cwd=d,
                                       env={**env, **case.env}, rlimit_fsize=case.rlimit_fsize, io_dir=io))
        for name, (d, launch) in list(running.items()):
            if launch.poll() is not None:
                results[name] = (d, launch.result())
                del running[name]
        time.sleep(0.05)
    failures = []
    for name, case in CASES.items():
        d, proc = results[name]
        try:
            assert_one_line_error(proc, case.fragment)
            run = d / "out"
            assert not (run / "final").exists(), "final/ written"
            assert not [p for p in (run / "checkpoints").glob("step-*") if (p / "manifest.json").exists()], \
                "a complete checkpoint written"
            assert not list((run / "checkpoints").glob(".tmp-*")) and not list(run.glob(".tmp*")), "debris left"
            assert run.exists() == (not case.before_run and not case.validate), \
                "the run directory was made" if case.before_run else "refused before the run: set before_run=True"
            if case.marker:
                assert not (d / case.marker).exists(), "code from the input ran"
        except AssertionError as e:
            failures.append(f"--- {name}: {str(e)[:1500]}")
        print(f"{name:32} exit {proc.returncode} run dir {'made' if (d / 'out').exists() else 'absent':6} "
              f"{(proc.stdout + proc.stderr).strip().splitlines()[-1][:160]}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- the same classes, every variant, in-process
# (config.json layouts and config objects only: no subprocess, no weights)


def test_model_kind_of_every_key_is_read_from_the_config(tmp_path, tiny_model_dir):
    """Each stage's model keys against each model kind (models.EXPECTED_KINDS), checked before any weights load."""
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import check_model_kind

    causal = copy_model(tiny_model_dir, tmp_path / "lm", weights=False)
    rm = reward_model(tiny_model_dir, tmp_path / "rm")
    classifier = reward_model(tiny_model_dir, tmp_path / "cls", labels=3)
    adapters = {}
    for task_type in ("CAUSAL_LM", "SEQ_CLS"):
        adapters[task_type] = write(tmp_path / task_type / "adapter_config.json",
                                    json.dumps({"task_type": task_type, "base_model_name_or_path": str(causal)})).parent
    custom = copy_model(tiny_model_dir, tmp_path / "custom", weights=False)  # custom code: the loader decides
    config = json.loads((custom / "config.json").read_text())
    write(custom / "config.json", json.dumps({**config, "architectures": ["MyScorer"], "auto_map": {"AutoModel": "x.Y"}}))
    refused = {  # (key, expected kind) -> the models it refuses, with the message fragment
        ("policy.path", "causal LM"): {rm: "is a reward model", classifier: "is a classifier",
                                       adapters["SEQ_CLS"]: "LoRA adapter with task_type SEQ_CLS"},
        ("reward.model.path", "reward model"): {causal: "is not a reward model", classifier: "3 output(s)",
                                                adapters["CAUSAL_LM"]: "task_type CAUSAL_LM"},
        ("critic.path", "either"): {},
    }
    for (key, expected), bad in refused.items():
        for model in (causal, rm, classifier, adapters["CAUSAL_LM"], adapters["SEQ_CLS"], custom):
            if model in bad:
                with pytest.raises(UserError, match=re.escape(bad[model])) as err:
                    check_model_kind(str(model), key, expected)
                assert str(err.value).startswith(f"{key}: {model} ") and "\n" not in str(err.value)
            else:
                check_model_kind(str(model), key, expected)


@pytest.mark.parametrize("stage,override,fragment", [
    ("rl", "seed=18446744073709551616", "seed=18446744073709551616 is out of range: it must be from -2**63 to 2**63-1"),
    ("sft", "seed=-9223372036854775809", "seed=-9223372036854775809 is out of range"),
    ("sft", "device.threads=4294967296", "device.threads=4294967296 is out of range: it must be from 1 to 2**31-1"),
    ("train-rm", "max_steps=100000000000000000000", "max_steps=100000000000000000000 is out of range"),
    ("rl", "rollout.max_new_tokens=100000000000000000000", "rollout.max_new_tokens=100000000000000000000 is out of range"),
])
def test_integers_out_of_range_are_refused_while_composing(stage, override, fragment):
    from rlhf_cli.commands.compose import compose_all
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose_all(stage, [override], multirun=False)


@pytest.mark.parametrize("stage,overrides,fragment", [
    ("rl", ["eval.max_new_tokens=160"], "eval.max_new_tokens=160 leaves no room for a prompt in policy.max_length=160"),
    ("rl", ["policy.max_length=64", "rollout.max_new_tokens=100"], "rollout.max_new_tokens=100 leaves no room for a "
                                                                     "prompt in policy.max_length=64"),
    ("sft", ["model.max_length=64", "eval.max_new_tokens=100"], "eval.max_new_tokens=100 leaves no room for a prompt "
                                                                  "in model.max_length=64"),
])
def test_response_limits_past_max_length_are_refused_while_composing(stage, overrides, fragment):
    """Variants of the table's "rl rollout longer than max_length" row: each response limit of each stage."""
    from rlhf_cli.commands.compose import compose_all
    from rlhf_cli.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(fragment)):
        compose_all(stage, overrides, multirun=False)


def test_response_limits_past_the_positions_are_refused_from_config_json(tiny_model_dir):
    """Variants of the table's "rl rollout longer than the positions" row, read from config.json alone (the
    embedded model has 256 positions): the limit must leave a prompt at least one position."""
    from rlhf_cli.errors import ConfigError
    from rlhf_cli.models import check_generation_fits

    check_generation_fits(str(tiny_model_dir), {"eval.max_new_tokens": 255, "rollout.max_new_tokens": 255})
    for key in ("eval.max_new_tokens", "rollout.max_new_tokens"):
        with pytest.raises(ConfigError, match=re.escape(f"{key}=256 does not fit the model's 256 positions")):
            check_generation_fits(str(tiny_model_dir), {key: 256})


def test_a_run_dir_given_as_a_model_names_its_final_model(tmp_path, tiny_model_dir):
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import check_model_dir

    run = finished_run(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match=re.escape(f"is a run directory, not a model; its trained model is in "
                                                  f"{run / 'final'}: set policy.path={run / 'final'}")):
        check_model_dir(str(run), "policy.path")
    shutil.rmtree(run / "final")
    with pytest.raises(UserError, match=re.escape(f"without a final/ model yet (the run has not finished); rerun "
                                                  f"its command to finish it, then set model.path={run / 'final'}")):
        check_model_dir(str(run), "model.path")


# (stage, overrides the user set, keys warned as ignored): one row per rule of config.READ_WHEN and per
# algorithm key that only some registry entries read, each with a config where it is read (no warning)
IGNORED = [
    ("rl", ["rollout.vllm.sleep=true", "rollout.is_cap=3"], ["rollout.vllm.sleep", "rollout.is_cap"]),  # engine auto
    ("sft", ["max_steps=100", "epochs=3"], ["epochs"]),
    ("sft", ["epochs=3"], []),  # max_steps null by default: epochs (or, unset too, the model's origin) decides
    ("sft", ["max_steps=null", "epochs=3"], []),
    ("train-rm", ["lora.alpha=8", "lora.save=adapter"], ["lora.alpha", "lora.save"]),
    ("train-rm", ["lora.r=4", "lora.alpha=8"], []),
    ("sft", ["logging.wandb_project=x"], ["logging.wandb_project"]),
    ("sft", ["data.train=t.jsonl", "data.num_train=5", "data.num_eval=2"], ["data.num_train", "data.num_eval"]),
    ("sft", ["data.num_train=5"], []),
    ("rl", ["algorithm=ppo", "algorithm.baseline=mean"], ["algorithm.baseline"]),
    ("rl", ["algorithm=reinforce", "algorithm.baseline=mean"], []),
    ("rl", ["algorithm=reinforce", "algorithm.lam=0.9", "algorithm.nstep=3", "algorithm.clip_low=0.1",
            "algorithm.clip_high=0.3"], ["algorithm.lam", "algorithm.nstep", "algorithm.clip_low", "algorithm.clip_high"]),
    ("rl", ["algorithm=ppo", "algorithm.lam=0.9", "algorithm.clip_low=0.1"], []),
    ("rl", ["algorithm=a2c", "algorithm.advantage=nstep", "algorithm.nstep=3", "algorithm.lam=0.9"], ["algorithm.lam"]),
    ("rl", ["algorithm=reinforce", "critic.init=policy", "critic.lr=1e-4", "placement.critic=cpu",
            "algorithm.value_coef=1"], ["critic.init", "critic.lr", "placement.critic", "algorithm.value_coef"]),
    ("rl", ["algorithm=a2c", "critic.lr=1e-4", "algorithm.value_clip=0.1", "algorithm.target_kl=0.1"],
     ["algorithm.value_clip", "algorithm.target_kl"]),
    ("rl", ["kl.horizon=500"], ["kl.horizon"]),
    ("rl", ["kl.target=6", "kl.horizon=500"], []),
    ("rl", ["reward.model.weight=2", "reward.model.normalize=false", "placement.reward=cpu"],
     ["reward.model.weight", "reward.model.normalize", "placement.reward"]),
    ("rl", ["reward=rm", "reward.model.path=/some/rm", "reward.function_weight=2"], ["reward.function_weight"]),
    ("rl", ["critic.path=null", "algorithm.baseline=rloo"], []),  # null is "unset"; rloo is read by reinforce
]


@pytest.mark.parametrize("stage,overrides,warned", IGNORED)
def test_keys_the_chosen_options_ignore_are_named(stage, overrides, warned):
    from rlhf_cli.commands.compose import compose_config
    from rlhf_cli.config import ignored_keys

    lines = ignored_keys(stage, compose_config(stage, overrides), overrides)
    assert [line.split("=", 1)[0] for line in lines] == warned, lines
    for line in lines:
        assert " is ignored: it is read only with " in line and "; drop the key or change that setting" in line


def test_every_algorithm_key_some_options_skip_has_a_rule():
    """The registry side of the table is derived: each algorithm key that a registered estimator or loss names
    in its signature, and that another one does not, is warned about under the one that does not."""
    import inspect

    from rlhf_cli.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
    from rlhf_cli.config import AlgorithmConfig
    from rlhf_cli.config.ignored import _registry_rules

    fields = set(AlgorithmConfig.__dataclass_fields__)
    partial = set()  # keys some entries of a registry read and others do not
    for registry in (ADVANTAGE_ESTIMATORS, POLICY_LOSSES):
        named = [set(inspect.signature(fn).parameters) & fields for fn in registry.values()]
        partial |= set().union(*named) - set.intersection(*named)
    ruled = {rule.keys[0].split(".", 1)[1] for rule in _registry_rules()}
    assert {"baseline", "lam", "nstep", "clip_low", "clip_high"} <= partial <= ruled


def test_an_ignored_key_is_one_warning_line_and_the_run_goes_on_without_it(tmp_path, tiny_model_dir):
    """epochs=3 with max_steps=2: the run warns that epochs is read only with max_steps=null, then does 2 steps."""
    from conftest import run_cli
    from helpers import read_metrics

    proc = run_cli("sft", *SFT, f"model.path={tiny_model_dir}", "output_dir=run", "epochs=3", "log_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: epochs=3 is ignored: it is read only with max_steps=null (a run counted in epochs), "
                        "and this run has max_steps=2; drop the key or change that setting"]
    assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [1, 2]


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """SIGINT while torch imports and the config composes (before the run's own step-boundary handler): one
    plain line, exit 130 as for a stop during training (signals.py), no traceback, no run directory."""
    import signal

    env = {**os.environ, "RLHF_NO_PROGRESS": "1"}
    for delay in (0.3, 1.5):
        # SIGINT at its default, as a terminal's foreground job has it: a shell starts a background job
        # (`make test &`) with SIGINT ignored, the child inherits that, and rlhf rightly leaves it alone
        proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "sft", "output_dir=run"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        out = (stdout + stderr).strip()
        assert proc.returncode == 130 and "Traceback" not in out and len(out.splitlines()) == 1, out
        assert out.startswith("stopped by SIGINT outside a training step"), out
        assert not (tmp_path / "run").exists()
