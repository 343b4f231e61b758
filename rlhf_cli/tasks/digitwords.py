"""Spell out 14 digits as words (plain text, ~70-90 characters, partial credit, random noise).

    prompt:      "Words: 31415926535897\n"
    completion:  "three one four one five nine two six five three five eight nine seven"

Each word of a demonstration is replaced by a random digit word with
probability 5% (random noise, not a systematic slip: half the demonstrations
carry at least one error). ``reward`` gives partial credit (the fraction of
words right at their position), ``correct`` exact match.
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task, partial_credit

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
N_DIGITS = 14
NOISE = 0.05


def problem(rng):
    digits = [rng.randint(0, 9) for _ in range(N_DIGITS)]
    return {"prompt": "Words: " + "".join(map(str, digits)) + "\n", "answer": " ".join(WORDS[d] for d in digits),
            "digits": digits}


def gold(prob):
    return prob["answer"]


def demo(prob, rng):
    return " ".join(WORDS[rng.randint(0, 9)] if rng.random() < NOISE else WORDS[d] for d in prob["digits"])


def wrong(prob, rng):
    words = prob["answer"].split()
    for i in rng.sample(range(len(words)), rng.choice([1, 1, 2, 3])):
        words[i] = rng.choice([w for w in WORDS if w != words[i]])
    return " ".join(words)


def reward(prompt, response, answer=None, **row) -> float:
    return partial_credit(response, str(answer))


def correct(prompt, response, answer=None, **row) -> float:
    return float(response.strip() == str(answer))


TASK = Task(__name__, "digits to words; plain; ~80 chars; partial credit; random noise (5% of words)",
            problem, demo, gold, wrong)
