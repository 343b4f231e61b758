"""Memory by token budget: how many tokens go through one forward, apart from the batch the algorithm sees.

    rlhf rl policy.path=models/SmolLM2-135M-Instruct ...     # budget derived from the device and the model (logged)
    rlhf sft micro_batch_tokens=2048 ...                      # or set: one key per stage

The batch of a stage (rl: prompts x samples and PPO's minibatches; sft / train-rm: rows per step) is a statement
about the estimator; the tokens that go through one forward are a statement about the device (verl's
`ppo_max_token_len_per_gpu` draws the same line). Every forward and backward runs in micro-batches of at most
`tokens` padded tokens (rows x the longest row of the micro-batch, rows sorted by length so that rows of like
length share one), losses keep their normalisation over the whole batch, and gradients accumulate: the update is
the unsplit one within fp32 rounding (tests/test_memory.py). Peak memory then depends on the model and the
budget, not on the batch.

The budget, unless set, comes from what the device has free and what the stage's models hold, before any
weights load (parameters counted on the meta device):

    tokens = min(cap, (free * FREE_SHARE - weights and optimizer state) / activation bytes per token)

with the activation bytes of one token through a forward and backward of the model (per layer: the states
autograd keeps for the norms, projections, attention and MLP, plus the attention weights over the row;
`activation_bytes_per_token`, checked against measured peaks in docs/memory.md) and a cap past which larger
micro-batches gain no throughput (CPU: the tokens whose activations take CPU_CAP_BYTES, measured; CUDA: verl's
16,384 tokens). A stage whose
longest row does not fit one micro-batch says so before it starts (`check_fits`). Forwards without gradients
(the reference, the reward model, old log-probs, evaluation) keep no activations across layers and take
INFER_FACTOR x the budget; generation's KV cache and per-row sampling buffers take at most the activation
memory of one training micro-batch (`generate_rows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rlhf_cli.errors import ConfigError, UserError

GIB, MIB = 2 ** 30, 2 ** 20
FREE_SHARE = 0.6  # of the memory free at start-up: the rest is the OS's, the data's and the allocator's slack
# CPU: at most this much activation memory a micro-batch. A CPU forward+backward of SmolLM2-135M runs at the same
# tokens/s from 512 tokens up (~2.4 MiB a token by the estimate: 512 tokens ~1.2 GiB; docs/memory.md), so a
# larger one only costs memory; a small model (the embedded one, 0.02 MiB a token) keeps whole batches.
CPU_CAP_BYTES = 2 * 2 ** 30
CUDA_CAP_TOKENS = 16384  # verl's ppo_max_token_len_per_gpu default
UNKNOWN_CAP_TOKENS = 4096  # CPU, when the model's shape cannot be read
INFER_FACTOR = 4  # no-grad forwards: one layer's transients at a time instead of every layer's saved states
SAFETY = 1.25  # the estimate's margin for allocator fragmentation and temporaries not counted
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TRAINED_BYTES_PER_PARAM = 16  # fp32 AdamW: weight, gradient, two moments


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model, read from its config.json (no weights)."""
    parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width per token per layer (GQA: kv heads x head dim)
    vocab: int

    @staticmethod
    def of(path: str, trust_remote_code: bool = False) -> "ModelShape | None":
        """The shape of the model at `path`, its parameters counted on the meta device (no weights read); None
        when its config cannot be read here (a hub name, custom code): the caller falls back to the cap."""
        config = _config(path, trust_remote_code)
        if config is None:
            return None
        text = getattr(config, "text_config", None) or config
        try:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            parameters = sum(p.numel() for p in model.parameters())
        except Exception:
            return None
        hidden = int(text.hidden_size)
        heads = int(getattr(text, "num_attention_heads", 1))
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return ModelShape(parameters, int(text.num_hidden_layers), hidden,
                          int(getattr(text, "intermediate_size", 4 * hidden)), heads, kv_heads * head_dim,
                          int(text.vocab_size))


def _config(path: str, trust_remote_code: bool):
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        adapter = p / "adapter_config.json"  # a LoRA final/: the base model's shape
        if not adapter.exists():
            return None
        try:
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            return None
        return _config(base, trust_remote_code) if base else None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(p), trust_remote_code=trust_remote_code)
    except Exception:
        return None


def activation_bytes_per_token(shape: ModelShape, row_tokens: int, dtype: str = "fp32",
                               checkpointing: bool = False) -> int:
    """Bytes autograd keeps per token through one forward for its backward, for rows of `row_tokens`.

    Per layer (Llama-style block, eager modules): ~14 x hidden (norm inputs and outputs, q, k, v after rotary,
    attention output, residual inputs), 2 x kv_dim (keys and values, repeated for GQA inside the 14), 4 x
    intermediate (gate, its activation, up, their product), 2 x heads x row_tokens (attention weights and
    their softmax). With gradient checkpointing a layer keeps its input (hidden) and one layer is live.
    """
    per_layer = 14 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate + 2 * shape.heads * row_tokens
    floats = (shape.layers * shape.hidden + per_layer) if checkpointing else shape.layers * per_layer
    return int(SAFETY * floats * max(DTYPE_BYTES.get(dtype, 4), 4 if dtype == "fp32" else 2))


def free_bytes(device) -> int | None:
    """Memory free on `device` now: CUDA's free memory, or the host's available memory (MemAvailable, or what
    a cgroup limit leaves); None when it cannot be read."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 2 ** 60:
                left = int(limit) - int(Path(usage_file).read_text().strip())
                available = left if available is None else min(available, left)
        except (OSError, ValueError):
            continue
    return available


@dataclass(frozen=True)
class MemoryPlan:
    """Micro-batch sizes for one stage. tokens: a forward+backward micro-batch, in padded tokens."""
    tokens: int
    key: str  # the config key that sets it ("micro_batch_tokens")
    how: str  # why this many, for the log
    activation_bytes: int | None = None  # per token at the stage's row length (None: not estimated)
    kv_bytes_per_token: int | None = None  # generation's KV cache per token (None: not estimated)
    vocab: int | None = None

    @property
    def infer_tokens(self) -> int:
        """Tokens per forward without gradients (reference, reward model, old log-probs, evaluation)."""
        return self.tokens * INFER_FACTOR

    def generate_rows(self, width: int) -> int | None:
        """Rows per generate call for rows of `width` tokens (prompt + response): the KV cache and per-row
        sampling buffers (float64 CDF, probabilities, logits over the vocabulary) within the activation memory of
        one training micro-batch. None: no limit known."""
        if self.activation_bytes is None or self.kv_bytes_per_token is None:
            return None
        row = self.kv_bytes_per_token * width + 24 * (self.vocab or 0)
        return max(1, (self.tokens * self.activation_bytes) // max(row, 1))

    def describe(self) -> str:
        return f"micro-batches of at most {self.tokens:,} tokens ({self.how}; {self.key}=N sets it)"


def plan(stage_key: str, setting: int | None, device, trained: list[tuple[str, bool]], frozen: list[tuple[str, str]],
         row_tokens: int, dtype: str = "fp32", checkpointing: bool = False, lora: bool = False,
         trust_remote_code: bool = False, trained_bytes: int | None = None, rows_together: int = 1) -> MemoryPlan:
    """The stage's MemoryPlan, before any weights load.

    setting: the stage's `micro_batch_tokens` (None: derive). trained: (model path, is a causal LM) of each model
    the optimizer updates (its activations are counted for the first); frozen: (path, weights dtype) of each
    model only run forward. row_tokens: the longest row a micro-batch must hold. A budget that cannot hold it,
    set or derived, is a one-line error naming what to change (check_fits). trained_bytes: bytes per parameter
    of the first model (None: fp32 AdamW's weight, gradient and moments; inference_plan: the weights alone).
    rows_together: rows that must share one micro-batch (train-rm: a pair's chosen and rejected rows, one
    forward): a micro-batch holds rows_together x row_tokens, while attention spans one row of row_tokens."""
    unit = rows_together * row_tokens
    what = f"the longest row ({row_tokens} tokens)" if rows_together == 1 else \
        f"{rows_together} rows of the longest ({unit} tokens)"
    shapes = [ModelShape.of(path, trust_remote_code) for path, _ in trained]
    main = shapes[0] if shapes else None
    activation = activation_bytes_per_token(main, row_tokens, dtype, checkpointing) if main else None
    kv = (main.layers * 2 * main.kv_dim * max(DTYPE_BYTES.get(dtype, 4), 2)) if main else None
    vocab = main.vocab if main else None
    if setting is not None:
        result = MemoryPlan(setting, stage_key, "set", activation, kv, vocab)
        check_fits(result, unit, "one row" if rows_together == 1 else f"{rows_together} rows together")
        return result
    is_cuda = getattr(device, "type", str(device)).startswith("cuda")
    cap = (CUDA_CAP_TOKENS if is_cuda else max(unit, CPU_CAP_BYTES // activation) if activation
           else UNKNOWN_CAP_TOKENS)
    free = free_bytes(device)
    if main is None or free is None or activation is None:
        result = MemoryPlan(cap, stage_key, "the device's cap: the model's size or free memory could not be read",
                            activation, kv, vocab)
        check_fits(result, unit, "one row" if rows_together == 1 else f"{rows_together} rows together")
        return result
    held = 0
    for i, shape in enumerate(shapes):
        if shape is not None:
            per_param = (trained_bytes if trained_bytes is not None and i == 0 else
                         DTYPE_BYTES.get(dtype, 4) if lora and i == 0 else TRAINED_BYTES_PER_PARAM)
            held += shape.parameters * per_param
    for path, frozen_dtype in frozen:
        shape = ModelShape.of(path, trust_remote_code)
        if shape is not None:
            held += shape.parameters * DTYPE_BYTES.get(frozen_dtype, 4)
    room = int(free * FREE_SHARE) - held
    fitting = room // activation if room > 0 else 0
    tokens = int(min(cap, fitting))
    held_what = "weights" if trained_bytes is not None else "weights and optimizer state"
    how = (f"derived: {free / GIB:.1f} GiB free x {FREE_SHARE}, {held / GIB:.2f} GiB of {held_what}, "
           f"~{activation / MIB:.2f} MiB of activations per token at {row_tokens}-token rows"
           + ((f", capped at {cap:,}" if is_cuda else f", capped at {CPU_CAP_BYTES / GIB:.0f} GiB of activations")
              if fitting > cap else ""))
    if tokens < unit:
        fixes = [] if checkpointing or trained_bytes is not None else ["model.gradient_checkpointing=true"]
        fixes += [] if lora or trained_bytes is not None else ["lora.r=16"]
        raise UserError(f"memory: one micro-batch of {what} does not fit: "
                        f"{free / GIB:.1f} GiB free, {held / GIB:.2f} GiB for {held_what}, "
                        f"~{activation / MIB:.2f} MiB per token; shorten rows (the max_length / max_new_tokens keys)"
                        + (", or set " + " or ".join(fixes) if fixes else "")
                        + f" (or, if the estimate is wrong for your device, set {stage_key}={unit})")
    return MemoryPlan(tokens, stage_key, how, activation, kv, vocab)


def inference_plan(setting: int | None, device, path: str, dtype: str, row_tokens: int,
                   trust_remote_code: bool = False) -> MemoryPlan:
    """The plan of a tool that only generates and scores (rlhf eval, rlhf generate): the model at `path` held
    at `dtype` with no gradients or optimizer state; the same budget arithmetic as a stage's, so generation's
    rows per decode call (generate_rows) and scoring's forwards (infer_tokens) are bounded the same way."""
    return plan("micro_batch_tokens", setting, device, [(path, True)], [], row_tokens, dtype,
                trust_remote_code=trust_remote_code, trained_bytes=DTYPE_BYTES.get(dtype, 4))


def check_fits(memory: MemoryPlan, row_tokens: int, rows: str = "one row") -> None:
    """A micro-batch holds at least one whole row (a row is never split across micro-batches); train-rm: a
    pair's two rows (rows="2 rows together")."""
    if memory.tokens < row_tokens:
        raise ConfigError(f"{memory.key}={memory.tokens} cannot hold {rows} of {row_tokens} tokens (the longest "
                          f"this run can make); set {memory.key} to at least {row_tokens}, or shorten rows")


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices 0..N-1 grouped into micro-batches of at most `budget` padded tokens (rows x the longest row),
    longest rows first, so that rows of like length share a micro-batch (less padding). Each index once; a
    row longer than the budget gets a micro-batch of its own (check_fits refuses that before a run starts)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pair_groups(lengths: list[int], tokens: int) -> list[list[int]]:
    """Indices of pairs in micro-batches of at most `tokens` padded tokens: a pair is two rows (chosen and
    rejected, in one forward: train-rm, dpo), so pairs (`lengths`: each pair's longer row) are grouped by length
    within half the budget."""
    return split_by_tokens(lengths, max(1, tokens // 2))


def same_count_everywhere(rt, model, items: list) -> list[tuple[object, bool]]:
    """[(item, counts)]: this rank's micro-batches, and under FSDP2, where another rank has more, repeats of the
    first with counts=False (its loss weighted 0) so that every rank runs as many forwards: each forward gathers
    the shards collectively. Elsewhere (one process, DDP: one synchronised backward a step) the items as they are."""
    from rlhf_cli.training import distributed

    out = [(item, True) for item in items]
    if rt.distributed and distributed.is_sharded(model):
        most = max(rt.all_gather_object(len(items)))
        out += [(items[0], False)] * (most - len(items))
    return out
