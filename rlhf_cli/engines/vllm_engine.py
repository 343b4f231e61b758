"""`rollout.engine=vllm`: vLLM in the training process, holding its own copy of the policy's weights.

    make install-vllm                                                    # .venv-vllm: CPU build here, CUDA build on a GPU box
    .venv-vllm/bin/rlhf rl rollout.engine=vllm                           # the embedded task, rollouts from vLLM
    .venv-vllm/bin/rlhf rl rollout.engine=vllm rollout.vllm.sleep=true   # CUDA: vLLM frees its memory while the policy trains

The engine is built from the policy's config alone (load_format="dummy": random weights, no
tokenizer, no generation_config.json defaults) and receives the policy's weights through
`sync_weights` before each rollout: the full weights; with LoRA the base plus B A alpha / r
(merged in a copy, the policy untouched); under FSDP2 each tensor gathered on every rank
(DTensor.full_tensor, collective), so every rank runs its own engine (data-parallel
generation; tensor parallelism is not offered). After a push the prefix cache is dropped, so
no prompt is continued from the keys and values of older weights.

Sampling matches the local engines: temperature, top-k, top-p, every stop id of the model,
no id past the tokenizer nor a pad token that is not a stop token (vLLM's allowed_token_ids).
The K samples of a prompt are one request with n=K (one prefill); its seed is derived from
(seed, step, the group's first global row), so reruns and resumes draw the same, ranks differ.
Log-probs are vLLM's `processed_logprobs`: log softmax(logits / T) over the allowed ids, which
is what training computes when top-k / top-p are off (with them on, vLLM's are of the filtered
distribution it sampled from). They are behaviour log-probs: the update's still come from
the training model (stages/rl.py logs the gap as rollout_logprob_diff and, with
rollout.is_cap, weights each token by the truncated ratio; docs/engines.md).

vLLM is imported here only, when this engine is built: the default path never imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch

from rlhf_cli.engines.rollout import Rollout, SamplingParams, response_mask_from_tokens
from rlhf_cli.errors import ConfigError, UserError



def check_installed(key: str) -> None:
    """A one-line ConfigError when `key`=vllm is chosen and vLLM is not importable (found without importing it)."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"{key}=vllm needs vLLM, which is not installed in this Python environment; run `make "
                          f"install-vllm` and use .venv-vllm/bin/rlhf (on a CUDA machine: pip install -e '.[vllm]'), "
                          f"or choose {key}=auto")


def check_model(path: str, key: str, engine_key: str = "rollout.engine") -> None:
    """A one-line UserError when vLLM cannot run the model at `path`: no implementation of its architecture,
    or (CPU backend) no attention kernel for its head size; read from config.json, before any weights load.
    Imports vLLM (seconds)."""
    config_file = Path(str(path)).expanduser() / "config.json"
    if not config_file.is_file():  # a hub name or an adapter dir: vLLM is asked once the model has loaded
        return
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    _quiet_import()

    import vllm
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    supported = ModelRegistry.get_supported_archs()
    missing = [a for a in architectures if a not in supported]
    if missing or not architectures:
        what = ", ".join(missing) or "a model without architectures in config.json"
        raise UserError(f"{key}: vLLM {vllm.__version__} cannot run {what} ({path}); choose {engine_key}=auto "
                        f"for this model")
    if current_platform.is_cpu():  # the CPU attention kernels exist for some head sizes only
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        head_dim = _head_dim(config)
        if head_dim not in sizes:
            raise UserError(f"{key}: vLLM's CPU backend has no attention kernel for head_dim {head_dim} ({path}; it "
                            f"has {', '.join(map(str, sizes))}); choose {engine_key}=auto, or a model with one of "
                            f"those head sizes")


def _head_dim(config: dict) -> int | None:
    """Attention head size from a config.json (its text config for a multimodal one)."""
    config = config.get("text_config", config)
    if config.get("head_dim"):
        return int(config["head_dim"])
    if config.get("hidden_size") and config.get("num_attention_heads"):
        return config["hidden_size"] // config["num_attention_heads"]
    return None


def _quiet_import() -> None:
    """One process, one engine: vLLM's engine core in this process (no worker processes to pickle weights to)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its start-up notes would drown the run's own lines


def request_seed(seed: int, step: int, row: int) -> int:
    """A 31-bit seed for the request whose first global row is `row` (its n samples take seed + 0..n-1)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{row}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") >> 1


class VLLMEngine:
    """A vLLM `LLM` holding a copy of the policy's weights, pushed by `sync_weights` (module docstring).

    options (rollout.vllm): gpu_memory_utilization (the fraction of the card, or on CPU of the
    machine's memory, vLLM may take for weights and KV cache), sleep (CUDA: release vLLM's memory
    between rollouts), max_model_len (prompt + response tokens), seed, distributed (under torchrun)."""

    separate_weights = True  # behaviour log-probs come from another copy of the weights: the RL stage compares

    def __init__(self, model: torch.nn.Module, stop_ids: list[int], pad_id: int, decoder: str = "vllm",
                 vocab_limit: int | None = None, options: dict | None = None):
        options = dict(options or {})
        self.stop_ids, self.pad_id, self.vocab_limit = list(stop_ids), pad_id, vocab_limit
        self.never = [pad_id] if pad_id is not None and pad_id not in stop_ids else None  # Gemma's <pad>
        self.sleep, self.asleep = bool(options.get("sleep", False)), False
        self.device = next(model.parameters()).device
        config = _base_config(model)
        rows = config.get_text_config().vocab_size
        allowed = range(min(rows, vocab_limit or rows))
        self.allowed = ([i for i in allowed if i not in (self.never or ())]
                        if len(allowed) < rows or self.never else None)  # None: every row of the vocabulary
        self.llm = _build_llm(config, next(model.parameters()).dtype, self.device, options)
        self.sync_weights(model)

    # ---------------------------------------------------------------- weights
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy's current weights (merged LoRA; FSDP2 shards gathered, collective) into vLLM's model."""
        self._wake()
        tensors = policy_tensors(policy)
        # vLLM's in-place reload: load_weights, then the per-layer processing its kernels need (CPU: repacking)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors})
        self.llm.apply_model(_refresh_output_heads)  # a tied head got no tensor of its own: repack it (CPU)
        self.llm.reset_prefix_cache()  # cached prompt keys / values were computed with the old weights

    def _wake(self) -> None:
        """rollout.vllm.sleep: weights back from host memory and a fresh KV cache before vLLM runs again."""
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ---------------------------------------------------------------- generation
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams) -> Rollout:
        """Left-padded prompts (B, P) -> B responses; runs of equal prompts (rl's K samples) are one request."""
        from vllm import SamplingParams as VLLMSamplingParams

        self._wake()
        groups = _runs(prompt_ids, prompt_mask)  # [(first row, rows)]
        requests, sampling = [], []
        for first, count in groups:
            ids = prompt_ids[first][prompt_mask[first].bool()].tolist()
            requests.append({"prompt_token_ids": ids})
            seed = request_seed(*params.noise_key[:2], params.noise_key[2] + first) if params.noise_key else None
            sampling.append(VLLMSamplingParams(
                n=1 if params.greedy else count, max_tokens=params.max_new_tokens,
                temperature=0.0 if params.greedy else params.temperature,
                top_k=params.top_k or 0, top_p=params.top_p if params.top_p is not None else 1.0, seed=seed,
                stop_token_ids=self.stop_ids,  # every id that ends a response (no tokenizer here: no eos of vLLM's own)
                allowed_token_ids=self.allowed, logprobs=0, detokenize=False, skip_special_tokens=False))
        with torch.autocast(self.device.type, enabled=False):  # vLLM runs its own dtype (the caller may autocast)
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = [c for out, (_, count) in zip(outputs, groups)  # greedy: one completion stands for its copies
                       for c in (sorted(out.outputs, key=lambda c: c.index) if len(out.outputs) == count
                                 else out.outputs * count)]
        rollout = self._rollout(prompt_ids, prompt_mask, completions, params.max_new_tokens)
        if self.sleep:  # level 1: weights to host memory, KV cache dropped, the GPU free while the policy trains
            self.llm.sleep(level=1)
            self.asleep = True
        return rollout

    def _rollout(self, prompt_ids, prompt_mask, completions, max_new_tokens: int) -> Rollout:
        """vLLM's completions as a Rollout: responses padded on the right, the stop token kept in the response."""
        rows = []
        for c in completions:
            tokens, logprobs = list(c.token_ids), [_sampled_logprob(lp, t) for lp, t in zip(c.logprobs, c.token_ids)]
            if c.finish_reason == "stop" and (not tokens or tokens[-1] not in self.stop_ids) and \
                    isinstance(c.stop_reason, int):  # the stop token itself, where vLLM left it out
                tokens.append(c.stop_reason)
                logprobs.append(0.0)
            rows.append((tokens[:max_new_tokens], logprobs[:max_new_tokens]))
        width = max(1, max(len(t) for t, _ in rows))
        response = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width)
        for b, (tokens, lps) in enumerate(rows):
            response[b, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[b, :len(lps)] = torch.tensor(lps)
        response_mask, stopped = response_mask_from_tokens(response, self.stop_ids)
        response = torch.where(response_mask.bool(), response, torch.full_like(response, self.pad_id))
        device = prompt_ids.device
        return Rollout(prompt_ids, prompt_mask.long(), response.to(device), response_mask.to(device),
                       (logprobs * response_mask).to(device), stopped.to(device))


def _refresh_output_heads(vllm_model: torch.nn.Module) -> None:
    """Re-run the weight processing of the output head(s). With tied embeddings the head receives no tensor
    of its own in a reload, and vLLM's CPU backend computes it from a packed copy made when it was last
    processed (the previous weights); on GPUs this processing does nothing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in vllm_model.modules():
        if isinstance(module, ParallelLMHead):
            module.quant_method.process_weights_after_loading(module)


def _sampled_logprob(position_logprobs, token: int) -> float:
    """The sampled token's log-prob from vLLM's per-position {id: Logprob} (logprobs=0: the sampled id only)."""
    entry = position_logprobs[token]
    return float(getattr(entry, "logprob", entry))


def _runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Consecutive equal rows (prompt and mask) -> [(first row, count)]: rl lays out a prompt's K samples together."""
    runs: list[tuple[int, int]] = []
    for b in range(prompt_ids.shape[0]):
        if runs and torch.equal(prompt_ids[b], prompt_ids[runs[-1][0]]) and \
                torch.equal(prompt_mask[b], prompt_mask[runs[-1][0]]):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _base_config(model: torch.nn.Module):
    """The HF config of the policy (under a peft wrapper or an FSDP2 class, the same config object)."""
    config = getattr(model, "config", None)
    if config is None:
        raise UserError("rollout.engine=vllm: the policy has no Hugging Face config to build vLLM's model from; "
                        "choose rollout.engine=auto")
    return config


def _build_llm(config, dtype: torch.dtype, device: torch.device, options: dict):
    """vLLM's LLM over a directory holding only the policy's config.json (random weights until the first push)."""
    _quiet_import()
    from vllm import LLM

    directory = Path(tempfile.mkdtemp(prefix="rlhf-vllm-"))
    config.save_pretrained(directory)  # config.json only: no tokenizer (we pass ids), no generation defaults
    kwargs = dict(model=str(directory), load_format="dummy", skip_tokenizer_init=True, generation_config="vllm",
                  dtype=str(dtype).removeprefix("torch."), logprobs_mode="processed_logprobs",
                  gpu_memory_utilization=float(options.get("gpu_memory_utilization", 0.2)),
                  seed=int(options.get("seed", 0)), enable_prefix_caching=True)
    if options.get("max_model_len"):
        kwargs["max_model_len"] = int(options["max_model_len"])
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # Every prefill scheduled whole. With chunked prefill, a step whose prompts exceed its token budget (CPU:
        # 4,096; the default 16 x 8 rollout is 128 prompts of 33 tokens, 4,224) ends on a partial prefill; vLLM
        # drops its sampled token and, for a seeded request (every rollout's: request_seed), rewinds the generator
        # with set_offset(get_offset() - 4) (v1/worker/gpu_model_runner.py, _bookkeeping_sync), which CPU
        # generators refuse ("CPU Generator does not use offset"). Without chunking a prompt that does not fit
        # waits for the next step, and vLLM raises max_num_batched_tokens to max_model_len so that each fits.
        kwargs["enable_chunked_prefill"] = False
    if options.get("sleep"):
        if device.type != "cuda":
            raise UserError("rollout.vllm.sleep=true needs CUDA (vLLM's sleep mode frees GPU memory); "
                            "set rollout.vllm.sleep=false on this device")
        kwargs["enable_sleep_mode"] = True
    if options.get("distributed"):  # under torchrun: an engine per rank in the ranks' own processes
        kwargs["distributed_executor_backend"] = "external_launcher"
    if device.type == "cuda":
        kwargs["device"] = "cuda"
    try:
        return LLM(**kwargs)
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise UserError(f"rollout.engine=vllm: vLLM did not start ({first}); lower or raise "
                        f"rollout.vllm.gpu_memory_utilization, or choose rollout.engine=auto") from None


def policy_tensors(policy: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of every parameter of the policy, as vLLM's load_weights reads them:
    LoRA layers merged (W + B A scaling, computed here; the policy keeps its adapters), FSDP2's DTensor
    shards gathered (collective: every rank calls this in the same order)."""
    lora_layers = {name: m for name, m in policy.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    tensors = []
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if ".lora_" in name:
                continue
            tensor = _full(param)
            owner = name.rsplit(".", 2)[0] if name.endswith((".base_layer.weight", ".base_layer.bias")) else None
            if owner in lora_layers and name.endswith(".weight"):
                tensor = tensor + _lora_delta(lora_layers[owner]).to(tensor.dtype)
            tensors.append((name.replace(".base_layer.", "."), tensor))
    return tensors


def _lora_delta(layer) -> torch.Tensor:
    """B A * scaling of a peft LoRA linear layer's active adapters (out_features, in_features)."""
    delta = 0
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            a, b = _full(layer.lora_A[adapter].weight), _full(layer.lora_B[adapter].weight)
            delta = delta + (b.float() @ a.float()) * layer.scaling[adapter]
    return delta


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 DTensor shard (all-gather, collective), or the tensor itself."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach()
