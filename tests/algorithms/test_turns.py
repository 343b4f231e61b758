"""Multi-turn credit (algorithms/turns.py): the environment's tokens off the time axis, checked by hand."""

import pytest
import torch

from rlhf_cli.algorithms import discounted_returns, gae, pack, pack_index, token_rewards, unpack

# one episode: assistant turn 1 (columns 0, 1), the environment's reply (2, 3), assistant turn 2 (4, 5), padding (6)
MASK = torch.tensor([[1, 1, 0, 0, 1, 1, 0]], dtype=torch.float64)
REWARDS = torch.tensor([[0.0, 0.5, 9.0, 9.0, 0.0, 1.0, 9.0]], dtype=torch.float64)  # 9: where no reward may count
VALUES = torch.tensor([[0.1, 0.2, 7.0, 7.0, 0.3, 0.4, 7.0]], dtype=torch.float64)


def test_pack_moves_each_rows_trained_tokens_to_the_front_and_unpack_puts_them_back():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 11, generator=generator) < 0.6
    mask[:, 0] = True  # every row has a trained token
    x = torch.randn(6, 11, generator=generator)
    index, packed_mask = pack_index(mask)
    packed = pack(x, index, packed_mask)
    for b in range(6):
        n = int(mask[b].sum())
        assert torch.equal(packed[b, :n], x[b][mask[b]])  # in order
        assert torch.equal(packed_mask[b], (torch.arange(packed.shape[1]) < n).float())  # a prefix
        assert not packed[b, n:].any()
    assert torch.equal(unpack(packed, index, packed_mask, 11), x * mask)


def test_gae_runs_across_the_environments_reply_as_if_it_were_not_there():
    gamma, lam = 0.9, 0.8
    index, packed_mask = pack_index(MASK)
    advantages, returns = gae(pack(REWARDS, index, packed_mask), pack(VALUES, index, packed_mask), packed_mask,
                              gamma=gamma, lam=lam)
    advantages, returns = (unpack(x, index, packed_mask, MASK.shape[1]) for x in (advantages, returns))
    # by hand over the assistant tokens (r 0, .5 | 1 at the end; V .1 .2 | .3 .4):
    # t=3: delta = 1 - .4 = .6                       A = .6
    # t=2: delta = 0 + .9 * .4 - .3 = .06            A = .06 + .72 * .6 = .492
    # t=1: delta = .5 + .9 * .3 - .2 = .57           A = .57 + .72 * .492 = .92424   (V of turn 2's first token)
    # t=0: delta = 0 + .9 * .2 - .1 = .08            A = .08 + .72 * .92424 = .7454528
    want = torch.tensor([[0.7454528, 0.92424, 0, 0, 0.492, 0.6, 0]], dtype=torch.float64)
    assert torch.allclose(advantages, want, atol=1e-12)
    assert torch.allclose(returns, (want + VALUES) * MASK, atol=1e-12)


def test_without_packing_gae_would_read_the_environments_tokens_as_steps_of_zero_value():
    # the estimators read a prefix mask: with holes, turn 1's last token would bootstrap from V = 0 of the
    # environment's first token (delta = .5 + 0 - .2) instead of V = .3 of turn 2's first (delta = .57)
    advantages, _ = gae(REWARDS, VALUES, MASK, gamma=0.9, lam=0.8)
    assert advantages[0, 1] != pytest.approx(0.92424)


def test_the_episode_return_reaches_every_earlier_turn():
    index, packed_mask = pack_index(MASK)
    rewards = token_rewards(torch.tensor([1.0], dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64),
                            packed_mask, 0.0, pack(REWARDS, index, packed_mask))  # the score on the last token
    returns = unpack(discounted_returns(rewards, packed_mask, 1.0), index, packed_mask, MASK.shape[1])
    assert returns.tolist() == [[2.5, 2.5, 0, 0, 2.0, 2.0, 0]]
