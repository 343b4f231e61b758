"""Model directories with the layouts of real checkpoints, built offline in the tests.

Each builder writes a Hugging Face directory whose tokenizer is trained here with
`tokenizers` (byte-level BPE on a small corpus) and carries the real special tokens
and the real chat-template string, and whose config is the real architecture with
the real vocabulary size and tiny hidden sizes (random weights):

- qwen2.5: Qwen2, vocab_size 151,936 (far more rows than the tokenizer has ids),
  `<|im_start|>` / `<|im_end|>` / `<|endoftext|>`, pad = `<|endoftext|>`, eos =
  `<|im_end|>`, no BOS, tied embeddings, ChatML template that injects a default
  system turn; generation_config stops on [im_end, endoftext].
- llama3: Llama, vocab_size 128,256, `<|begin_of_text|>` added by the tokenizer AND
  written by the chat template (the doubled-BOS trap), NO pad token, eos =
  `<|eot_id|>`, `eos_token_id` a list [end_of_text, eom_id, eot_id] in config.json and
  generation_config.json (Llama 3.1), untied embeddings.
- gemma: Gemma, vocab_size 256,000, `<bos>` added by the tokenizer and written by the
  template, `<start_of_turn>` / `<end_of_turn>`, pad `<pad>`, eos `<eos>`,
  generation_config stops on [eos, end_of_turn], tied embeddings, a template that
  refuses a system role.

The special tokens take the fixture tokenizer's ids (Gemma's first ones, as in the
real vocabulary; Qwen's and Llama's after the BPE vocabulary); the configs name those ids.

    from layouts import build_layout, chat_rows
    path = build_layout("llama3", tmp_path / "llama3")
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from rlhf_cli import task

# Qwen2.5-Instruct's tokenizer_config.json chat_template, verbatim
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Meta-Llama-3-Instruct's chat_template, verbatim: it writes bos_token itself
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# gemma-2-it's chat_template, verbatim: bos_token written, no system role, assistant is 'model'
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

TINY_DIMS = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=512)

LAYOUTS = {
    "qwen2.5": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], specials_first=False,
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), bos_added=None, template=QWEN25_TEMPLATE,
        model_type="qwen2", vocab_size=151936, tie=True,
        config_ids=dict(bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"),
        generation_eos=["<|im_end|>", "<|endoftext|>"]),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>"], specials_first=False,
        tokens=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), bos_added="<|begin_of_text|>",
        template=LLAMA3_TEMPLATE, model_type="llama", vocab_size=128256, tie=False,
        config_ids=dict(bos_token_id="<|begin_of_text|>",
                        eos_token_id=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
        generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "gemma": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], specials_first=True,
        tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"), bos_added="<bos>",
        template=GEMMA_TEMPLATE, model_type="gemma", vocab_size=256000, tie=True,
        config_ids=dict(pad_token_id="<pad>", bos_token_id="<bos>", eos_token_id="<eos>"),
        generation_eos=["<eos>", "<end_of_turn>"]),
}
END_OF_TURN = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


def chat_rows(kind: str, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """The embedded task as conversations: sft -> `messages`, pairs -> prompt/chosen/rejected message
    lists, prompts -> `messages` (one user turn) + `answer`."""
    user = lambda text: [{"role": "user", "content": text.strip()}]  # noqa: E731
    if kind == "sft":
        return [{"messages": user(r["prompt"]) + [{"role": "assistant", "content": r["completion"]}]}
                for r in task.sft_rows(n, seed, split, n_eval=n)]
    if kind == "pairs":
        return [{"prompt": user(r["prompt"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                for r in task.preference_rows(n, seed, split, n_eval=n)]
    return [{"messages": user(r["prompt"]), "answer": r["answer"]} for r in task.prompt_rows(n, seed, split, n_eval=n)]


def _corpus() -> list[str]:
    rows = task.sft_rows(200, 0, "train", n_eval=50)
    return ([r["prompt"] + r["completion"] for r in rows]
            + ["system user assistant model You are Qwen, created by Alibaba Cloud. You are a helpful assistant."] * 20)


def build_tokenizer(layout: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every text tokenizes) trained on the task's text, with the layout's special tokens,
    BOS post-processor and chat template."""
    spec = LAYOUTS[layout]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=spec["specials"] if spec["specials_first"] else [], show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    if not spec["specials_first"]:
        backend.add_special_tokens(spec["specials"])
    if spec["bos_added"]:  # Llama 3 and Gemma: the tokenizer itself prepends BOS
        bos = spec["bos_added"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **spec["tokens"])
    tok.chat_template = spec["template"]
    return tok


def build_layout(layout: str, directory: Path, seed: int = 0, **config_overrides) -> Path:
    """A model directory (config.json, generation_config.json, weights, tokenizer) of `layout`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec, directory = LAYOUTS[layout], Path(directory)
    tok = build_tokenizer(layout)
    ids = lambda t: [tok.convert_tokens_to_ids(x) for x in t] if isinstance(t, list) else tok.convert_tokens_to_ids(t)  # noqa: E731
    config = AutoConfig.for_model(spec["model_type"], vocab_size=spec["vocab_size"], tie_word_embeddings=spec["tie"],
                                  **{k: ids(v) for k, v in spec["config_ids"].items()}, **{**TINY_DIMS, **config_overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=ids(spec["generation_eos"]),
                                               pad_token_id=getattr(config, "pad_token_id", None))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
