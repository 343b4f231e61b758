"""Bad input as one table (issue 6): input -> exit 2, one `error:` line naming the problem, no
traceback, and nothing written that a later run would trust (no final/, no complete checkpoint).

    .venv/bin/pytest -q tests/test_bad_inputs.py

Config problems fail before any model loads (well under a second each); data, model and disk problems
need the stage's imports, so every case is launched at once (a few at a time) as a real
`python -m rlhf_cli` subprocess. This is the one bad-input table of the suite: every kind the issue
lists across the three stages (the eval tool's arguments are in tests/cli/test_tools.py). Column
`before_run`: refused while composing (no run directory at all) or by the stage (run directory made);
every row: exit 2, one line, no final/, no complete checkpoint, no half-written debris.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from conftest import assert_one_line_error
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


def copy_model(src: Path, dst: Path, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


def other_tokenizer(d: Path, m: Path) -> list[str]:
    from rlhf_cli.embedded import build_tokenizer

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
    "rl bad choice": Case("rl", lambda d, m: ["kl.estimator=k2"], "kl.estimator='k2' is not one of"),
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
    "disk full as the run starts": Case("rl", lambda d, m: [], "could not write: file too large", rlimit_fsize=1500, before_run=False),
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
                                  "could not read", before_run=False),
    "sft csv wrong columns": Case("sft", lambda d, m: ["data.train=" + str(write(d / "q.csv", "question,answer\nhi,1\n"))],
                                  "needs prompt/completion or messages", before_run=False),
    "train-rm every pair over-long": Case("train-rm", long_pairs, "none of its", before_run=False),
    # ---- models and tokenizers
    "rl reward model with another tokenizer": Case("rl", lambda d, m: ["reward=rule_rm",
                                                                    f"reward.model.path={other_tokenizer(d, m)[0].split('=', 1)[1]}"],
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
    "rl unknown engine": Case("rl", lambda d, m: ["rollout.engine=vllm"], "rollout.engine='vllm' is not one of auto, lean, hf"),
    "rl lean engine under fsdp": Case("rl", lambda d, m: ["rollout.engine=lean", "device.distributed=fsdp"],
                                      "rollout.engine=lean cannot decode an FSDP-sharded policy"),
}


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG

    return apply


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
            running[name] = (d, subprocess.Popen(
                [sys.executable, "-m", "rlhf_cli", case.stage, *BASE[case.stage], *model, *out, *args], cwd=d, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                preexec_fn=_limit_file_size(case.rlimit_fsize) if case.rlimit_fsize else None))
        for name, (d, proc) in list(running.items()):
            if proc.poll() is not None:
                stdout, stderr = proc.communicate()
                results[name] = (d, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
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
            assert run.exists() == (not case.before_run), \
                "the run directory was made" if case.before_run else "refused before the run: set before_run=True"
            if case.marker:
                assert not (d / case.marker).exists(), "code from the input ran"
        except AssertionError as e:
            failures.append(f"--- {name}: {str(e)[:1500]}")
        print(f"{name:32} exit {proc.returncode} run dir {'made' if (d / 'out').exists() else 'absent':6} "
              f"{(proc.stdout + proc.stderr).strip().splitlines()[-1][:160]}")
    assert not failures, "\n".join(failures)
