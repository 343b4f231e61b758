"""Loading models and tokenizers through the real Hugging Face path, with one-line errors.

A causal LM (policy, reference), a one-output sequence classifier (reward model,
critic), or the embedded tiny model written into the run dir. A LoRA final/ loads
as its base with the adapter merged in.
"""

from __future__ import annotations

import logging
import operator
from pathlib import Path

import torch

from rlhf_cli.config.origin import read_json as _read_json
from rlhf_cli.errors import ConfigError, UserError, first_line
from rlhf_cli.models import embedded, lora
from rlhf_cli.training import runtime
from rlhf_cli.training.runtime import DTYPES


# What a model key must hold, by stage: read from the config's `architectures` (or a LoRA adapter's
# task_type) before any weights load. "either": a causal LM gets a fresh one-output head, an existing
# scalar-head model keeps its own (train-rm's starting point; a critic, like critic.init=policy).
CAUSAL_LM, REWARD_MODEL, CLASSIFIER, EITHER = "causal LM", "reward model", "classifier", "either"
EXPECTED_KINDS = {
    "sft": {"model.path": CAUSAL_LM},
    "dpo": {"model.path": CAUSAL_LM},
    "train-rm": {"model.path": EITHER},
    "rl": {"policy.path": CAUSAL_LM, "reference.path": CAUSAL_LM, "reward.model.path": REWARD_MODEL,
           "critic.path": EITHER},
}
GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
SCALAR_HEAD_SUFFIX = "ForSequenceClassification"


def check_model_dir(path: str, key: str) -> None:
    """A one-line UserError when `path` (the value of `key`) is not a model directory: missing, a run
    directory (its model is in final/), a training checkpoint, or a dir without config.json."""
    p = Path(path).expanduser()
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not p.exists():
        raise UserError(f"{key}: {path} does not exist; point it at a model directory (e.g. runs/sft/final)")
    if not p.exists():
        return  # a hub name
    if _is_run_dir(p):
        final = p / "final"
        if final.is_dir():
            raise UserError(f"{key}: {path} is a run directory, not a model; its trained model is in {final}: "
                            f"set {key}={final}")
        raise UserError(f"{key}: {path} is a run directory without a final/ model yet (the run has not finished); "
                        f"rerun its command to finish it, then set {key}={final}")
    if p.parent.name == "checkpoints" and (p / "manifest.json").exists():
        run = p.parent.parent
        raise UserError(f"{key}: {path} is a training checkpoint (resume state), not a model directory; use the "
                        f"run's model, {key}={run / 'final'} (rerunning the run's command resumes from this checkpoint)")
    if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
        raise UserError(f"{key}: {path} is not a Hugging Face model directory (no config.json, nor a LoRA "
                        f"adapter's adapter_config.json); point it at a model directory (e.g. runs/sft/final)")


def _is_run_dir(p: Path) -> bool:
    """A run directory of this tool: its config.json is the run's config (no model_type), beside checkpoints/."""
    config = _read_json(p / "config.json")
    return (p / "checkpoints").is_dir() and "model_type" not in config and "output_dir" in config


def model_kind(path: str) -> tuple[str | None, str]:
    """(CAUSAL_LM, REWARD_MODEL (one output), CLASSIFIER (several) or None when not known, what the dir's
    config says). Custom code
    (auto_map) and unfamiliar architecture names are not judged: the loader decides."""
    p = Path(path).expanduser()
    if lora.is_adapter_dir(p):
        task_type = _read_json(p / lora.ADAPTER_CONFIG).get("task_type")
        kind = {"CAUSAL_LM": CAUSAL_LM, "SEQ_CLS": REWARD_MODEL}.get(task_type)
        return kind, f"a LoRA adapter with task_type {task_type}"
    config = _read_json(p / "config.json")
    names = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    said = f"architectures {names}" if names else "no architectures"
    if config.get("auto_map") or not names:
        return None, said
    if any(a.endswith(GENERATIVE_SUFFIXES) for a in names):
        return CAUSAL_LM, said
    if all(a.endswith(SCALAR_HEAD_SUFFIX) for a in names):
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2  # transformers' default: 2
        return (REWARD_MODEL if labels == 1 else CLASSIFIER), f"{said}, {labels} output(s)"
    return None, said


def check_model_kind(path: str, key: str, expected: str) -> None:
    """A one-line UserError when the model at `path` is of the wrong kind for `key`, read from its config
    (no weights): a scalar-head model where a causal LM is expected, or a causal LM / a many-label
    classifier where a reward model is expected (its fresh head would score every response 0)."""
    if expected == EITHER or not Path(path).expanduser().exists():
        return
    kind, said = model_kind(path)
    if expected == CAUSAL_LM and kind in (REWARD_MODEL, CLASSIFIER):
        raise UserError(f"{key}: {path} is a {kind} ({said}: scores per sequence, no language-model head), "
                        f"not a causal LM; give a causal LM there, e.g. an sft final/ (runs/sft/final) or a base "
                        f"model; a reward model goes in reward.model.path (rlhf eval: reward_model=)")
    if expected == REWARD_MODEL and kind in (CAUSAL_LM, CLASSIFIER):
        raise UserError(f"{key}: {path} is not a reward model ({said}); its score head would be new, so every "
                        f"response would score 0: give a train-rm final/ (e.g. runs/rm/final), or train one with "
                        f"rlhf train-rm model.path={path}")


def configured_models(stage: str, cfg) -> list[tuple[str, str, str]]:
    """(key, path, expected kind) of every model path the stage's config sets (unset ones are left out)."""
    out = []
    for key, expected in EXPECTED_KINDS[stage].items():
        path = operator.attrgetter(key)(cfg)
        if path:
            out.append((key, str(path), expected))
    return out


def check_models(stage: str, cfg) -> None:
    """Every model path of a stage's config: a model directory (or hub name) of the kind its key needs.
    Called at the start of a stage's setup and by `rlhf validate`, before any weights load."""
    for key, path, expected in configured_models(stage, cfg):
        check_model_dir(path, key)
        check_model_kind(path, key, expected)


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_dir(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{key}: could not load a tokenizer from {path}: {first_line(e)}") from None
    if tok.pad_token_id is None:  # Llama 3: no pad token. Pad with EOS: every mask comes from lengths, never
        tok.pad_token = tok.eos_token  # from ids == pad, so a padded EOS and a real one are never confused
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
        raise UserError(f"{key}: {path} does not load as a causal LM: {first_line(e)}") from None
    return model.to(device) if device is not None else model


def load_trained_causal_lm(path: str, model_cfg, lora_cfg, weights_dtype, rt, run_root: Path):
    """The causal LM a stage trains (sft, dpo): loaded at the stage's weights dtype on its device, gradient
    checkpointing as model_cfg says, LoRA adapters when lora.r > 0 (then only they train) -> (model, adapters or
    None, the checkpoint's parts: the adapter tensors alone under LoRA)."""
    model = load_causal_lm(path, "model.path", weights_dtype, rt.device, model_cfg.trust_remote_code)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    adapters = lora.attach(model, lora_cfg, "CAUSAL_LM", path, run_root, rt)
    return model, adapters, {"model": (adapters.state if adapters else model, "")}


def load_scalar_head_model(path: str, key: str, dtype: str = "fp32", device=None, trust_remote_code: bool = False,
                           pad_id: int | None = None):
    """A sequence classifier with one output (reward model or critic). From a causal LM
    checkpoint the head is new (zero-initialised so a fresh head scores 0). A config without
    a pad id gets `pad_id` (the tokenizer's, so a client of final/ pads as we do), else the
    first of its EOS ids: never the list a Llama 3 config holds."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_dir(path, key)
    quiet_transformers()
    if lora.is_adapter_dir(path):  # a LoRA final/ (reward model or policy): base + adapter merged
        model = lora.load_merged(path, key, lambda base: load_scalar_head_model(base, key, dtype, None, trust_remote_code,
                                                                                 pad_id))
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
                        f"{first_line(e)}") from None
    if fresh_head:
        with torch.no_grad():
            scalar_head(model).weight.zero_()
    if model.config.pad_token_id is None:  # Llama 3 layouts: no pad, eos_token_id a list of stop ids
        model.config.pad_token_id = pad_id if pad_id is not None else (_ids(model.config.eos_token_id) or [None])[0]
    return model.to(device) if device is not None else model


def scalar_head(model) -> torch.nn.Linear:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        # a LoRA reward model's head is peft's ModulesToSaveWrapper around the Linear (a trainable copy)
        if isinstance(head, torch.nn.Linear) or isinstance(getattr(head, "original_module", None), torch.nn.Linear):
            return head
    raise UserError(f"{type(model).__name__} has no linear score head this tool knows (score / classifier)")


def _ids(value) -> list[int]:
    """An eos_token_id field (None, an id, or a list of ids) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(tokenizer, model_or_path) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, then each `eos_token_id` of the model's
    config and generation config (Llama 3.1: [<|end_of_text|>, <|eom_id|>, <|eot_id|>]; Qwen2.5:
    [<|im_end|>, <|endoftext|>]; Gemma: [<eos>, <end_of_turn>]). `model_or_path`: a loaded model, or
    its directory (read without loading weights)."""
    if isinstance(model_or_path, (str, Path)):
        configs = [_read_json(Path(model_or_path) / name) for name in ("config.json", "generation_config.json")]
        found = [c.get("eos_token_id") for c in configs]
    else:
        inner = model_or_path.get_base_model() if hasattr(model_or_path, "get_base_model") else model_or_path
        found = [getattr(getattr(inner, attr, None), "eos_token_id", None) for attr in ("config", "generation_config")]
    ids = [tokenizer.eos_token_id] + [i for value in found for i in _ids(value)]
    return list(dict.fromkeys(i for i in ids if i is not None and i < len(tokenizer)))  # ordered, no repeats


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def position_limit(path: str) -> int | None:
    """The model's position table size from its config.json (None: not stated, or not a local dir)."""
    config = _read_json(Path(path).expanduser() / "config.json")
    config = config.get("text_config", config)  # multimodal wrappers keep the LM's config inside
    return next((int(config[k]) for k in POSITION_KEYS if isinstance(config.get(k), int)), None)


def check_generation_fits(path: str, lengths: dict[str, int]) -> None:
    """Before any weights load: each `key -> max_new_tokens` leaves room for a prompt in the model's
    position table (config.json), or a one-line ConfigError naming both numbers and the fix."""
    positions = position_limit(path)
    for key, new_tokens in lengths.items():
        if positions is not None and new_tokens >= positions:
            raise ConfigError(f"{key}={new_tokens} does not fit the model's {positions} positions "
                              f"(max_position_embeddings in {path}/config.json) with any prompt; set {key} "
                              f"below {positions} (prompt + response must fit)")


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


def dropout_off(model):
    """Eval mode (dropout off) for a model that still trains (the RL policy): every module in eval mode but the
    layers with gradient checkpointing enabled, which transformers checkpoints only in training mode
    (GradientCheckpointingLayer: `self.gradient_checkpointing and self.training`); the dropout modules inside
    them stay off. A plain `model.eval()` would silently turn policy.gradient_checkpointing off."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            module.training = True
    return model


def frozen(model):
    """Eval mode (dropout off) and no gradients: the reference and the reward model."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_same_tokenizer(tok_a, tok_b, what: str) -> None:
    probe = "Solve 12+3 = ? The answer: 15.\n<eos> ünïcode"
    if tok_a.get_vocab() != tok_b.get_vocab() or tok_a(probe)["input_ids"] != tok_b(probe)["input_ids"]:
        raise UserError(f"{what} uses a different tokenizer from the policy; train it from the same base model")
