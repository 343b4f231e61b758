"""The embedded default: a byte-level tokenizer built in code and a tiny Llama.

Both are saved as ordinary Hugging Face directories and loaded back through
``from_pretrained``, so the embedded default takes the same path as a user's
model.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from rlhf_cli.config import origin

PAD, EOS = "<pad>", "<eos>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<eos>{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ~150k parameters: learns the embedded task in about a minute on 2 CPU cores.
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level: every UTF-8 text tokenizes, one token per byte; pad distinct from EOS."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS,
                                  additional_special_tokens=CHAT_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_config(tokenizer, **overrides) -> LlamaConfig:
    vocab = ((len(tokenizer) + 7) // 8) * 8
    # origin.MARK: a model built from a config (the from-scratch defaults apply to it and its final/s)
    return LlamaConfig(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=None, **{**TINY, origin.MARK: True, **overrides})


def write_embedded_base(directory: Path, seed: int, **overrides) -> Path:
    """Save a freshly initialised tiny model + tokenizer as a Hugging Face dir."""
    import torch
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    tok = build_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(tok, **overrides))
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(directory)
    return directory
