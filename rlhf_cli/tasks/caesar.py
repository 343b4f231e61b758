"""Shift letters along a short alphabet (plain text, 6 characters, partial credit, systematic slip).
Held out: never used to choose a default.

    prompt:      "Shift +2 in abcdefgh: hagbec\n"
    completion:  "bchdge"

Letters wrap around from h to a. The demonstrator forgets to wrap 60% of the
time and writes the letter past h ('i', 'j', 'k'), so greedy decoding after
SFT gets the wrapping words wrong. ``reward``: fraction of letters right;
``correct``: exact match.
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task, partial_credit

ALPHABET = "abcdefgh"
SLIP_PROB = 0.6


def problem(rng):
    shift = rng.randint(1, 3)
    word = "".join(rng.choice(ALPHABET) for _ in range(6))
    return {"prompt": f"Shift +{shift} in {ALPHABET}: {word}\n", "answer": _shift(word, shift), "word": word,
            "shift": shift}


def _shift(word: str, shift: int, wrap: bool = True) -> str:
    out = []
    for ch in word:
        i = ALPHABET.index(ch) + shift
        out.append(ALPHABET[i % len(ALPHABET)] if wrap or i < len(ALPHABET) else chr(ord("a") + i))
    return "".join(out)


def gold(prob):
    return prob["answer"]


def demo(prob, rng):
    return _shift(prob["word"], prob["shift"], wrap=rng.random() >= SLIP_PROB)


def wrong(prob, rng):
    unwrapped = _shift(prob["word"], prob["shift"], wrap=False)
    if unwrapped != prob["answer"] and rng.random() < 0.6:
        return unwrapped
    return _shift(prob["word"], prob["shift"] % 3 + 1)


def reward(prompt, response, answer=None, **row) -> float:
    return partial_credit(response, str(answer), sep=None)


def correct(prompt, response, answer=None, **row) -> float:
    return float(response.strip() == str(answer))


TASK = Task(__name__, "shift letters with wrap-around; plain; 6 chars; partial credit; systematic slip (60%)",
            problem, demo, gold, wrong)
