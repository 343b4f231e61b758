"""Rewards for reasoning with verifiable answers: name them in `reward.functions` (or `eval.rule`).

    rlhf rl reward.functions=[rlhf_cli.reasoning:answer_reward]                    # 1 if the final answer is right
    rlhf rl 'reward.functions=[rlhf_cli.reasoning:answer_reward,rlhf_cli.reasoning:format_reward]'
    rlhf eval runs/rl/final eval.rule=rlhf_cli.reasoning:answer_reward

Each reward is ``f(prompt, response, **row) -> float`` like every reward function
(rlhf_cli/rewards/__init__.py); ``answer_reward`` reads the row's ``answer`` column. The
helpers below them are plain string functions, reusable in your own rewards:

    >>> extract_final_answer(r"so the total is \\boxed{\\frac{3}{4}}.")
    '\\\\frac{3}{4}'
    >>> extract_final_answer("... 48 + 24 = 72\\n#### 72")
    '72'
    >>> answers_match("1,234.0", "1234"), answers_match("0.75", "3/4"), answers_match("+5", "5")
    (True, True, True)

What counts as the final answer, in this order (the first that is present wins;
when the response has a ``</think>``, only the text after the last one is read):

1. the last ``\\boxed{...}`` (nested braces kept: ``\\boxed{\\frac{1}{2}}``);
2. the text after the last ``#### `` (GSM8K's convention), to the end of its line;
3. the text after the last ``Answer:`` (any case), to the end of its line;
4. the last number in the text.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

_THINK_END = "</think>"
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?![\d])")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_RE = re.compile(r"answer\s*[:：]\s*([^\n]*)", re.IGNORECASE)
_FRAC_RE = re.compile(r"^([-+]?)\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}$")
_THINK_FORMAT_RE = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if none closes."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start != -1:
        open_at = text.find("{", start)
        if open_at != -1 and text[start:open_at].strip("\\boxedfbox ") == "":
            depth = 0
            for i in range(open_at, len(text)):
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    return text[open_at + 1:i].strip()
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_final_answer(response: str) -> str | None:
    """The final answer a response states (see the module docstring for the order), or None.

    The result is the answer's text, stripped of spaces, a trailing period and
    surrounding ``$``; compare it with :func:`answers_match`.
    """
    text = response.rsplit(_THINK_END, 1)[-1]
    found = _last_boxed(text)
    if found is None:
        for pattern in (_HASHES_RE, _ANSWER_RE):
            matches = pattern.findall(text)
            if matches and matches[-1].strip():
                found = matches[-1]
                break
    if found is None:
        numbers = _NUMBER_RE.findall(text)
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    found = found.strip().rstrip(".").strip().strip("$").strip()
    return found or None


def parse_number(text: str) -> Fraction | None:
    """The exact number a short answer denotes, or None.

    Accepts integers, decimals (``3.50``, ``.5``, ``5.0``), fractions (``3/4``,
    ``\\frac{3}{4}``, ``\\dfrac``), thousands separators (``1,234,567``), a leading
    ``+``, surrounding ``$`` / ``\\$`` and a trailing ``%`` sign or period. A text with
    words and exactly one number (``72 dollars``, ``x = 5``) is that number; two numbers
    or none (``3 or 4``, ``Paris``) is None. ``1,23`` is not a thousands separator (None).
    """
    s = text.strip().replace("\\$", "").replace("\\%", "").replace("\\!", "").strip("$ ").rstrip(".%").strip()
    frac = _FRAC_RE.match(s)
    if frac:
        sign, num, den = frac.groups()
        s = f"{sign}{num.strip()}/{den.strip()}"
    candidates = [s] if re.fullmatch(_NUMBER, s) else _NUMBER_RE.findall(s)
    if len(candidates) != 1:
        return None
    numerator, _, denominator = re.sub(r"\s+", "", candidates[0]).replace(",", "").partition("/")
    try:
        return Fraction(numerator) / Fraction(denominator or 1)  # Fraction("1.5/3") itself is refused
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+", " ", text.strip().strip("$").rstrip(".").strip()).lower()


def answers_match(predicted: str | None, gold) -> bool:
    """Whether a predicted answer equals the gold one: as exact numbers when both are numbers
    (``0.75 == 3/4``, ``1,000 == 1000.0``), else as text (case, spaces, ``$`` and ``\\text{}`` ignored)."""
    if predicted is None:
        return False
    gold = str(gold)
    predicted_number, gold_number = parse_number(predicted), parse_number(gold)
    if predicted_number is not None and gold_number is not None:
        return predicted_number == gold_number
    return _normalise_text(predicted) == _normalise_text(gold)


def answer_key(response: str) -> Fraction | str | None:
    """What majority voting compares: the final answer as an exact number, else as normalised text;
    None when the response states no answer (:func:`extract_final_answer`)."""
    answer = extract_final_answer(response)
    if answer is None:
        return None
    number = parse_number(answer)
    return number if number is not None else _normalise_text(answer)


def gold_answer(answer) -> str:
    """The row's ``answer`` as a short answer: a worked solution ending in ``#### n`` or holding a
    ``\\boxed{}`` (GSM8K, MATH) gives its final answer; anything else is taken as it is."""
    text = str(answer)
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        return extract_final_answer(text) or text
    return text


def answer_reward(prompt: str, response: str, answer=None, **row) -> float:
    """1.0 when the response's final answer (:func:`extract_final_answer`) matches the row's ``answer``
    (:func:`answers_match`), else 0.0. Rows need an ``answer`` column (a number, text, or a worked
    solution ending in ``#### n``)."""
    if answer is None:
        raise ValueError("the row has no 'answer' field to check against")
    return 1.0 if answers_match(extract_final_answer(response), gold_answer(answer)) else 0.0


def format_reward(prompt: str, response: str, **row) -> float:
    """1.0 when the response is ``<think>...</think>`` (one block, non-empty, at the start) followed by an
    answer :func:`extract_final_answer` can read, else 0.0 (DeepSeek-R1's format reward, Guo et al. 2025).

    ``"<think>2+2 is 4</think> Answer: 4"`` -> 1.0; ``"Answer: 4"`` (no thinking), ``"<think></think>4"``
    (empty), ``"<think>4</think>"`` (nothing after), ``"<think>a</think><think>b</think>4"`` -> 0.0.
    """
    match = _THINK_FORMAT_RE.match(response)
    if match is None:
        return 0.0
    thought, rest = match.groups()
    if not thought.strip() or "<think>" in thought or "<think>" in rest or _THINK_END in rest:
        return 0.0
    return 1.0 if rest.strip() and extract_final_answer(rest) is not None else 0.0


def make_length_penalty(free_chars: int = 400, max_chars: int = 2000, scale: float = 0.5
                        ) -> Callable[..., float]:
    """A reward function penalising long responses: 0 up to ``free_chars`` characters, then falling
    linearly to ``-scale`` at ``max_chars`` and staying there.

    Formula: ``-scale * clip((len(response) - free_chars) / (max_chars - free_chars), 0, 1)``.
    Added to a 0/1 correctness reward with ``scale < 1`` it only breaks ties: a right answer
    always beats a wrong one, and among right answers the shorter wins. To use other numbers,
    put ``my_penalty = make_length_penalty(200, 1000, 0.2)`` in your own module and name
    ``my_module:my_penalty``.
    """
    if not 0 <= free_chars < max_chars:
        raise ValueError(f"make_length_penalty needs 0 <= free_chars < max_chars, got {free_chars}, {max_chars}")

    def length_penalty(prompt: str, response: str, **row) -> float:
        over = (len(response) - free_chars) / (max_chars - free_chars)
        return -scale * min(max(over, 0.0), 1.0)

    length_penalty.__doc__ = (f"0 up to {free_chars} characters, then linearly down to -{scale} at {max_chars} "
                              f"(make_length_penalty({free_chars}, {max_chars}, {scale})).")
    return length_penalty


length_penalty = make_length_penalty()  # 0 up to 400 characters, -0.5 from 2000 on
