"""rlhf_cli.training.evaluation's sampled metrics: the unbiased pass@k against brute force, maj@k by hand."""

from __future__ import annotations

import itertools

import pytest

from rlhf_cli.training.evaluation import majority_correct, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (8, 2, 1, 0.25),           # pass@1 = c / n
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (8, 0, 8, 0.0), (8, 1, 8, 1.0), (8, 7, 2, 1.0),   # n - c < k: every k-subset holds a correct one
])
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


@pytest.mark.parametrize("n", [5, 8])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n):
    """Chen et al.'s estimator equals enumerating every k-subset of the n samples."""
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("responses, checks, expected", [
    (["Answer: 0.5", "Answer: 1/2", "Answer: 3"], [True, True, False], True),     # 0.5 and 1/2 vote together
    (["#### 3", "Answer: 1/2", r"\boxed{3.0}"], [False, True, False], False),     # 3 wins 2:1, and it is wrong
    (["Answer: 4", "Answer: 5"], [False, True], False),                           # a tie goes to the first seen
    (["Answer: 5", "Answer: 4"], [True, False], True),
    (["no idea", "Answer: 7", "hmm"], [False, True, False], True),                # no answer: no vote
    (["no idea", "still none"], [False, False], False),                           # no votes at all: wrong
    (["Answer: Paris", "answer: paris.", "Answer: Rome"], [True, True, False], True),  # text answers, normalised
])
def test_majority_vote_by_hand(responses, checks, expected):
    assert majority_correct(responses, checks) is expected
