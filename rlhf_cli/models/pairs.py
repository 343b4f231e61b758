"""A preference pair's two responses scored in one forward, their common part computed once.

A pair is a prompt and two responses. Run as two whole rows (TRL's DPOTrainer: chosen and rejected
concatenated, each row prompt + response), the prompt goes through the model twice, and so do the tokens both
responses start with (a corrected answer, a branch that parts at step k, a template's opening). Here each
pair is one block of a packed row instead: the prompt and the c tokens both responses share, then the chosen
response's rest, then the rejected response's rest, under a tree-shaped attention mask (each rest attends to
the shared part and to itself, never to the other rest) with each rest's positions continuing the shared
part's. Every token's state is then the one it has in its own whole row, so the log-probs are the whole rows'
to float rounding (tests/test_pairs.py), and the shared part's tokens are computed, and scored, once.
This is prefix sharing for DPO (Wang et al. 2024, "Accelerating Direct Preference Optimization with Prefix
Sharing", arXiv:2410.20305), here with the responses' common start shared too. Blocks are packed first-fit
into rows of at most ROW_TOKENS (or the longest block), so there is little padding either.

A model whose attention the mask cannot describe (a sliding window shorter than a row, non-attention layers, an
attention implementation that ignores 4D masks, remote code: tree_unsupported) gets each response as a whole
right-padded row with its own causal mask: the same numbers, without the sharing.

Shapes: B pairs; R rows of L tokens; N scored tokens (each response's tokens, shared ones once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_cli.data import first_fit
from rlhf_cli.models.logprobs import causal_lm, gathered_logprobs

# the longest packed row unless a block is longer: a row's attention grows with its square. Forward + backward of
# a batch, 2 CPU threads, the embedded pairs: SmolLM2-135M (8 pairs of ~52 tokens) 3.33 / 3.28 / 3.39 s with rows
# of one block / at most 128 / 256 tokens (whole rows: 4.79 s); the tiny model (16 pairs of ~75 tokens, where
# attention weighs more) 32.4 / 33.2 / 38.0 ms (whole rows: 45.7 ms)
ROW_TOKENS = 128
SHARED, CHOSEN, REJECTED = 0, 1, 2  # PairLayout.side


@dataclass
class PairLayout:
    """One forward's inputs for B pairs, and where each response token's log-prob is read.

    inputs: input_ids (R, L), attention_mask ((R, 1, L, L) bool tree mask, or (R, L) for whole rows),
    position_ids (R, L). at (N,): flat positions r * L + t whose state predicts targets (N,); pair (N,): the
    token's pair; side (N,): SHARED (counted in both responses), CHOSEN or REJECTED; tokens (2, B): each
    response's token count."""
    inputs: dict[str, torch.Tensor]
    at: torch.Tensor
    targets: torch.Tensor
    pair: torch.Tensor
    side: torch.Tensor
    tokens: torch.Tensor


def shared_tokens(chosen: list[int], rejected: list[int]) -> int:
    """How many leading tokens two responses to one prompt share, at most all but each one's last (each keeps a
    token of its own after the shared part)."""
    limit = min(len(chosen), len(rejected)) - 1
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return n


def pair_layout(pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int, tree: bool = True) -> PairLayout:
    """pairs: (prompt ids, chosen ids, rejected ids) each -> PairLayout. tree: one block per pair in packed rows
    under a tree mask; else each response a whole right-padded row."""
    B = len(pairs)
    blocks = []  # (pair, token ids, [(side, positions whose states are read, targets)], branch of each token)
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        c = shared_tokens(chosen, rejected) if tree else 0
        P, p = len(prompt), len(prompt) + c
        if tree:
            a, b = chosen[c:], rejected[c:]
            # the state before a token sits at the token before it; a rest's first token follows the shared part
            reads = [(SHARED, list(range(P - 1, p - 1)), chosen[:c]),
                     (CHOSEN, [p - 1] + list(range(p, p + len(a) - 1)), a),
                     (REJECTED, [p - 1] + list(range(p + len(a), p + len(a) + len(b) - 1)), b)]
            blocks.append((i, prompt + chosen[:c] + a + b, reads, [0] * p + [1] * len(a) + [2] * len(b)))
        else:
            for side, response in ((CHOSEN, chosen), (REJECTED, rejected)):
                blocks.append((i, prompt + response, [(side, list(range(P - 1, P + len(response) - 1)), response)],
                               [0] * (P + len(response))))
    rows, L = _pack(blocks) if tree else ([[blk] for blk in blocks], max(len(blk[1]) for blk in blocks))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    block_of = torch.full_like(ids, -1)
    branch = torch.zeros_like(ids)
    at, targets, owner, side = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for i, tokens, reads, branches in row:
            n = len(tokens)
            ids[r, offset:offset + n] = torch.tensor(tokens, dtype=torch.long)
            branch[r, offset:offset + n] = torch.tensor(branches, dtype=torch.long)
            block_of[r, offset:offset + n] = i
            shared = branches.count(0)
            pos = list(range(shared)) + list(range(shared, shared + branches.count(1))) + list(
                range(shared, shared + branches.count(2)))
            positions[r, offset:offset + n] = torch.tensor(pos, dtype=torch.long)
            for s, where, wanted in reads:
                at += [r * L + offset + t for t in where]
                targets += wanted
                owner += [i] * len(wanted)
                side += [s] * len(wanted)
            offset += n
    tokens = torch.tensor([[len(c) for _, c, _ in pairs], [len(r) for _, _, r in pairs]], dtype=torch.long)
    inputs = {"input_ids": ids, "position_ids": positions,
              "attention_mask": _tree_mask(block_of, branch) if tree else (block_of >= 0).long()}
    at, targets, owner, side = (torch.tensor(x, dtype=torch.long) for x in (at, targets, owner, side))
    return PairLayout(inputs, at, targets, owner, side, tokens.view(2, B))


def _pack(blocks: list) -> tuple[list[list], int]:
    """Blocks into the rows of least padded area: for each row count R, rows of the longest block or total / R
    tokens (at most ROW_TOKENS unless one block is longer: attention grows with the square of a row), first-fit."""
    longest, total = max(len(b[1]) for b in blocks), sum(len(b[1]) for b in blocks)
    best = None
    for count in range(1, len(blocks) + 1):
        length = max(longest, -(-total // count))
        if length > max(longest, ROW_TOKENS):
            continue
        rows = [[blocks[i] for i in row] for row in first_fit([len(b[1]) for b in blocks], length)]
        if best is None or len(rows) * length < len(best[0]) * best[1]:
            best = rows, length
    return best


def _tree_mask(block_of: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(R, L) block ids (-1: padding) and branches (0 shared, 1 and 2 the rests) -> (R, 1, L, L) bool, True where
    query i may attend key j: same block, j not after i, and j shared or on i's own branch. A padding position
    attends to itself alone (a query with no key at all would be nan)."""
    L = block_of.shape[1]
    index = torch.arange(L)
    block = torch.where(block_of >= 0, block_of, -2 - index)  # each pad its own block
    same = block[:, :, None] == block[:, None, :]
    causal = index[:, None] >= index[None, :]
    on_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return (same & causal & on_branch)[:, None]


def tree_unsupported(model, longest_row: int | None = None) -> str | None:
    """Why the tree mask cannot stand for `model`'s own masks (None when it can): a 4D mask given to a transformers
    model replaces what it builds itself, so only causal attention layers, in sdpa or eager, qualify, and a sliding
    window only where it is no shorter than the longest whole row (prompt + response: what a token of the tree
    sees), so that the window would have cut nothing."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    inner = causal_lm(model)
    config = getattr(inner, "config", None)
    if config is None or not type(inner).__module__.startswith("transformers.models."):
        return "the model's code is its own"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} takes no 4D mask"
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config DynamicCache cannot read
        return "its layer types are unknown"
    if not all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return "some layers are not causal attention (linear attention, a state space)"
    windows = [layer.sliding_window for layer in layers if type(layer) is DynamicSlidingWindowLayer]
    if windows and (longest_row is None or min(windows) < longest_row):
        return f"a sliding window of {min(windows)} tokens is shorter than a row ({longest_row} tokens)"
    return None


def pair_sums(model, pairs: list[tuple[list[int], list[int], list[int]]], pad_id: int, device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ((B,) chosen and (B,) rejected summed log-probs, (2, B) token counts): one forward over pair_layout,
    tree-shaped where the model allows it (tree_unsupported), each response whole otherwise."""
    longest_row = max(len(prompt) + max(len(chosen), len(rejected)) for prompt, chosen, rejected in pairs)
    layout = pair_layout(pairs, pad_id, tree=tree_unsupported(model, longest_row) is None)
    logprobs = gathered_logprobs(model, {k: v.to(device) for k, v in layout.inputs.items()}, layout.at.to(device),
                                 layout.targets.to(device))  # (N,)
    pair, side = layout.pair.to(device), layout.side.to(device)
    zeros = logprobs.new_zeros(len(pairs))
    chosen = zeros.index_add(0, pair, torch.where(side != REJECTED, logprobs, 0.0))
    rejected = zeros.index_add(0, pair, torch.where(side != CHOSEN, logprobs, 0.0))
    return chosen, rejected, layout.tokens.to(device)
