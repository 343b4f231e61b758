"""Reward-model scores: the scalar head read at the last real token of each row.

train-rm trains on exactly the sequences `scoring_ids` builds (prompt + response + EOS,
each part tokenized on its own), so rl, held-out evaluation and `rlhf eval` score
the way the reward model was trained.
"""

from __future__ import annotations

import torch

from rlhf_cli.data import encode
from rlhf_cli.logprobs import token_values


def last_token_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """Reward-model score read at the last real token of each row, any padding side: (B,)."""
    values = token_values(model, input_ids, attention_mask)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.long()).argmax(-1)  # rightmost real token
    return values.gather(1, last[:, None]).squeeze(1)


def scoring_ids(tokenizer, prompt: str, response: str) -> list[int]:
    """Token ids a reward model scores: prompt + response + EOS, each part tokenized on its own.

    train-rm trains on exactly these sequences, so the score is read at the EOS token.
    """
    return encode(tokenizer, prompt) + encode(tokenizer, response) + [tokenizer.eos_token_id]


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
def score_texts(model, tokenizer, prompts: list[str], responses: list[str], device, batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores of (prompt, response) texts, read at the appended EOS: (N,) float32 on CPU.

    Prompts are already rendered text (chat prompts through the chat template).
    The same sequences and score position as train-rm's training and eval.
    """
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(prompts), batch_size):
        seqs = [scoring_ids(tokenizer, p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = pad_right(seqs, tokenizer.pad_token_id)
        scores.append(last_token_scores(model, ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)
