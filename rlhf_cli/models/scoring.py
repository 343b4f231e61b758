"""Reward-model scores: the scalar head read at the last real token of each row.

train-rm trains on exactly the sequences `scoring_ids` builds (the text prompt + response
tokenized whole, nothing appended), so rl (which re-scores the decoded response text),
held-out evaluation, `rlhf eval` and any client of final/ score the way it was trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlhf_cli import data
from rlhf_cli.data import encode_prompt
from rlhf_cli.errors import DataError
from rlhf_cli.models.logprobs import token_values
from rlhf_cli.training import memory


def last_token_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Reward-model score read at the last real token of each row, any padding side: (B,)."""
    values = token_values(model, input_ids, attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)  # rightmost real token
    return values.gather(1, last[:, None]).squeeze(1)


def scoring_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids a reward model scores: the text prompt + response tokenized whole, nothing appended.

    train-rm trains on exactly these sequences and reads the score at the last token, which is
    what any client of the saved final/ does (its tokenizer on prompt + response, the one logit).
    Exactly one BOS where the tokenizer uses one (data.encode_prompt): rendered chat prompts
    that carry theirs keep it, plain text gets it; nothing else is added.
    """
    return encode_prompt(tokenizer, prompt + response)


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and mask; masks come from lengths, never from ids != pad."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(sequences):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask


@torch.no_grad()
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], device, batch_size: int = 64,
                tokens: int | None = None) -> torch.Tensor:
    """Reward-model scores of (prompt, response) texts, read at the last token: (N,) float32 on CPU.

    Prompts are already rendered text (chat prompts through the chat template).
    The same sequences and score position as train-rm's training and eval.
    Forwards of `batch_size` rows in order, or with `tokens` (a stage's memory plan) of at most that many
    padded tokens, rows sorted by length; scores come back in the input's order either way.
    """
    was_training = model.training
    model.eval()
    seqs = [scoring_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    groups = (memory.split_by_tokens([len(s) for s in seqs], tokens) if tokens else
              [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)])
    scores = torch.zeros(len(seqs))
    for group in groups:
        ids, mask = pad_right([seqs[i] for i in group], tokenizer.pad_token_id)
        scores[group] = last_token_scores(model, ids.to(device), mask.to(device)).float().cpu()
    model.train(was_training)
    return scores


# ---------------------------------------------------------------- preference pairs (train-rm, rlhf validate)


@dataclass
class Pair:
    """One tokenized preference pair: each side is `prompt + response` tokenized whole (scoring_ids)."""
    prompt: str
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, key: str, use_margin: bool) -> tuple[list[Pair], int]:
    """-> (pairs, number dropped). A pair longer than max_length is dropped, not cut:
    cutting would remove the last token the score is read at, or the very tokens that differ."""
    pairs, dropped = [], 0
    for i, row in enumerate(rows):
        prompt, chosen, rejected = data.split_pair_row(tokenizer, row, i, key)
        margin = row.get("margin") if use_margin else None
        try:
            margin = 0.0 if margin is None else float(margin)
        except (TypeError, ValueError):
            raise DataError(f"{data.where(row, key, i)}: has margin {margin!r}, not a number; fix it or set "
                            f"margin_from_data=false") from None
        if not math.isfinite(margin):
            raise DataError(f"{data.where(row, key, i)}: has a non-finite margin ({margin}); fix it or set "
                            f"margin_from_data=false")
        pair = Pair(prompt, scoring_ids(tokenizer, prompt, chosen), scoring_ids(tokenizer, prompt, rejected), margin)
        if pair.length > max_length:
            dropped += 1
            continue
        pairs.append(pair)
    return pairs, dropped
