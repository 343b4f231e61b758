"""Multi-turn credit: the environment's tokens taken off the time axis, so every estimator runs across turns.

An episode's response region interleaves assistant tokens (trained, mask 1) with the environment's (context,
mask 0). The estimators of advantages.py read a mask that is a prefix of each row. Packing moves each row's
assistant tokens to the front, in order, so that turn k's last token is followed by turn k+1's first: the
estimators run unchanged on the packed rows (GAE's ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)`` then takes
V at the next *assistant* token across the environment's reply, the critic valued at each turn, as in
verl's multi-turn agent loop, which masks tool tokens out of the advantage; REINFORCE's return-to-go sums the
later turns' rewards), and unpacking puts the results back, 0 on the environment's tokens.
"""

from __future__ import annotations

import torch


def pack_index(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's trained tokens go when packed to the front.

    Args:
        mask: (B, T) 0/1 (or bool) trained-token mask; any pattern of holes.

    Returns:
        index (B, N): for packed position j < n_b, the column of row b's j-th trained token (0 beyond n_b);
        packed_mask (B, N) float: 1 on j < n_b, a prefix of each row; N = max_b n_b (at least 1).
    """
    m = mask.bool()
    counts = m.sum(-1)
    width = max(1, int(counts.max())) if m.numel() else 1
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # trained columns first, in order
    index = order[:, :width] if order.shape[1] >= width else torch.nn.functional.pad(order, (0, width - order.shape[1]))
    packed_mask = (torch.arange(width, device=mask.device)[None, :] < counts[:, None]).float()
    return torch.where(packed_mask.bool(), index, torch.zeros_like(index)), packed_mask


def pack(x: torch.Tensor, index: torch.Tensor, packed_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, N): row b's values at its trained columns, in order; 0 beyond them. ``x[b, index[b, j]]``."""
    return x.gather(1, index) * packed_mask.to(x.dtype)


def unpack(y: torch.Tensor, index: torch.Tensor, packed_mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, N) -> (B, width): the inverse of :func:`pack` on trained columns, 0 on every other column."""
    out = torch.zeros(y.shape[0], width, dtype=y.dtype, device=y.device)
    return out.scatter_add(1, index, y * packed_mask.to(y.dtype))
