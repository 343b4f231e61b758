"""Loading models and tokenizers through the real Hugging Face path, with one-line errors.

A causal LM (policy, reference), a one-output sequence classifier (reward model,
critic), or the embedded tiny model written into the run dir. A LoRA final/ loads
as its base with the adapter merged in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from rlhf_cli import embedded, lora, runtime
from rlhf_cli.errors import UserError
from rlhf_cli.runtime import DTYPES


def check_model_dir(path: str, key: str) -> None:
    """A one-line UserError when `path` (the value of `key`) is not a model directory."""
    p = Path(path).expanduser()
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"{key}: {path} does not exist; point it at a model directory (e.g. runs/sft/final)")
    if p.exists() and not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise UserError(f"{key}: {path} is not a Hugging Face model directory (no config.json, nor a LoRA "
                        f"adapter's adapter_config.json)")


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: could not load a tokenizer from {path}: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # allowed: masks come from lengths
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer at {path} has no EOS token; responses could never stop")
    tok.padding_side = "left"
    return tok


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_causal_lm(path: str, key: str, dtype: str = "fp32", device=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    check_model_dir(path, key)
    quiet_transformers()
    if lora.is_adapter_dir(path):  # a LoRA final/: its base with the adapter merged in
        model = lora.load_merged(path, key, lambda base: load_causal_lm(base, key, dtype, None, trust_remote_code))
        return model.to(device) if device is not None else model
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: {path} does not load as a causal LM: {str(e).splitlines()[0][:200]}") from None
    return model.to(device) if device is not None else model


def load_scalar_head_model(path: str, key: str, dtype: str = "fp32", device=None, trust_remote_code: bool = False):
    """A sequence classifier with one output (reward model or critic). From a causal LM
    checkpoint the head is new (zero-initialised so a fresh head scores 0)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_dir(path, key)
    quiet_transformers()
    if lora.is_adapter_dir(path):  # a LoRA final/ (reward model or policy): base + adapter merged
        model = lora.load_merged(path, key, lambda base: load_scalar_head_model(base, key, dtype, None, trust_remote_code))
        return model.to(device) if device is not None else model
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        fresh_head = getattr(config, "num_labels", None) != 1 or not any(
            a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: {path} does not load as a causal LM or sequence classifier: "
                        f"{str(e).splitlines()[0][:200]}") from None
    if fresh_head:
        with torch.no_grad():
            scalar_head(model).weight.zero_()
    if model.config.pad_token_id is None:  # Llama 3 layouts: no pad, eos_token_id a list of stop ids
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model.to(device) if device is not None else model


def scalar_head(model) -> torch.nn.Linear:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        # a LoRA reward model's head is peft's ModulesToSaveWrapper around the Linear (a trainable copy)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
    raise UserError(f"{type(model).__name__} has no linear score head this tool knows (score / classifier)")


def model_path(model_cfg, run_root: Path, seed: int, rt: runtime.Runtime) -> str:
    """model.path, or the embedded tiny model written once into <run>/base (same from_pretrained path)."""
    if model_cfg.path:
        return str(model_cfg.path)
    base = Path(run_root) / "base"
    if rt.is_main:
        quiet_transformers()
        embedded.write_embedded_base(base, seed)
    rt.barrier()
    return str(base)


def model_and_tokenizer(model_cfg, key: str, run_root: Path, seed: int, rt: runtime.Runtime):
    """-> (the path of `key`'s model (the embedded one written into the run when unset), its tokenizer)."""
    path = model_path(model_cfg, run_root, seed, rt)
    return path, load_tokenizer(path, f"{key}.path", model_cfg.trust_remote_code)


def frozen(model):
    """Eval mode (dropout off) and no gradients: the reference and the reward model."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_tokenizer(tok_a, tok_b, what: str) -> None:
    probe = "Solve 12+3 = ? The answer: 15.\n<eos> ünïcode"
    if tok_a.get_vocab() != tok_b.get_vocab() or tok_a(probe)["input_ids"] != tok_b(probe)["input_ids"]:
        raise UserError(f"{what} uses a different tokenizer from the policy; train it from the same base model")
