"""rlhf_cli.reasoning: final-answer extraction, numeric equivalence and the reasoning rewards on tricky strings,
called the way the stages call every reward function (imported by dotted path, f(prompt, response, **row))."""

from __future__ import annotations

import doctest
from fractions import Fraction

import pytest

from rlhf_cli import reasoning
from rlhf_cli.reasoning import answers_match, extract_final_answer, gold_answer, make_length_penalty, parse_number
from rlhf_cli.rewards import call_reward, import_reward_function


@pytest.mark.parametrize("response, expected", [
    (r"so it is \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),                              # nested braces kept
    (r"first \boxed{3}, corrected: \boxed{ \dfrac{7}{8} }", r"\dfrac{7}{8}"),  # the last box
    (r"\boxed{x^{2}} #### 9", "x^{2}"),                                     # a box beats ####
    (r"\boxed{12 and then 13", "13"),                                       # unclosed box: last number
    (r"\fbox{3/4}", "3/4"),
    ("48 + 24 = 72\n#### 72", "72"),                                        # GSM8K
    ("#### 1,234.\nthanks, 5", "1,234"),                                    # #### beats a later number
    ("Final Answer: $-0.5$.", "-0.5"),
    ("answer: 7\nAnswer: 8 apples", "8 apples"),                            # the last Answer:, to end of line
    ("it is 5. or maybe 7.", "7"),                                          # the last number
    ("about .5 of it", ".5"),
    ("x2 and y3 and -4", "-4"),                                             # digits inside words are not numbers
    ("<think>Answer: 3</think>so the result is 4", "4"),                    # only after the last </think>
    ("<think>I think 3 or 4</think>", None),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_answer(response, expected):
    assert extract_final_answer(response) == expected


@pytest.mark.parametrize("text, expected", [
    ("42", Fraction(42)), ("+5", Fraction(5)), ("-3", Fraction(-3)), ("5.0", Fraction(5)), ("5.", Fraction(5)),
    ("3.50", Fraction(7, 2)), (".5", Fraction(1, 2)), ("3/4", Fraction(3, 4)), ("-3 / 4", Fraction(-3, 4)),
    ("1.5/3", Fraction(1, 2)), (r"\frac{3}{4}", Fraction(3, 4)), (r"-\dfrac{1}{2}", Fraction(-1, 2)),
    ("1,234,567", Fraction(1234567)), ("$1,000$", Fraction(1000)), (r"\$20", Fraction(20)), ("50%", Fraction(50)),
    ("72 dollars", Fraction(72)), ("x = 5", Fraction(5)),
    ("1,23", None), ("3 or 4", None), ("Paris", None), ("5/0", None), ("", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("predicted, gold, equal", [
    ("1,234.0", "1234", True), ("0.75", "3/4", True), (r"\frac{3}{4}", 0.75, True), ("+5", 5, True),
    ("5.00", "5", True), ("72 dollars", "72", True), ("-0.5", "1/2", False), ("1,23", "123", False),
    ("0.333", "1/3", False),                                                # exact, not rounded
    (r"\text{Paris}", "paris", True), ("Paris ", "Paris.", True), ("London", "Paris", False), (None, "5", False),
])
def test_answers_match(predicted, gold, equal):
    assert answers_match(predicted, gold) is equal


def test_gold_answer_reads_worked_solutions():
    assert gold_answer("Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72") == "72"
    assert gold_answer(r"The sum is $\boxed{\frac{5}{6}}$.") == r"\frac{5}{6}"
    assert gold_answer(7) == "7" and gold_answer("Paris") == "Paris"


REWARDS = {name: import_reward_function(f"rlhf_cli.reasoning:{name}")
           for name in ("answer_reward", "format_reward", "length_penalty")}


def _call(name, response, **row):
    return call_reward(REWARDS[name], name, "What is 6 * 12?", response, {"prompt": "What is 6 * 12?", **row})


@pytest.mark.parametrize("response, answer, value", [
    (r"6 * 12 = 72, so \boxed{72}", "72", 1.0),
    ("<think>6*10=60, 6*2=12, 60+12=71?</think> Answer: 72.0", 72, 1.0),    # the thinking's 71 is not read
    ("72 ... no wait, it is 73", 72, 0.0),                                  # the last number is the answer
    ("#### 72", "She had 48 + 24 = 72 clips.\n#### 72", 1.0),               # a GSM8K-style gold solution
    ("Answer: 3/4", "0.75", 1.0),
    ("I do not know", 72, 0.0),
])
def test_answer_reward(response, answer, value):
    assert _call("answer_reward", response, answer=answer) == value


def test_answer_reward_without_an_answer_column_names_the_fix():
    from rlhf_cli.errors import UserError

    with pytest.raises(UserError, match="no 'answer' field"):
        _call("answer_reward", "72")


@pytest.mark.parametrize("response, value", [
    ("<think>6*12 = 72</think> Answer: 72", 1.0),
    ("  <think>\nstep 1\nstep 2\n</think>\n\\boxed{72}", 1.0),
    ("<think>6*12 = 72</think> seventy-two", 0.0),                          # nothing readable as an answer
    ("Answer: 72", 0.0),                                                    # no thinking
    ("<think> </think> 72", 0.0),                                           # empty thinking
    ("<think>72</think>", 0.0),                                             # nothing after it
    ("<think>a</think><think>b</think> 72", 0.0),                           # two blocks
    ("<think>a <think>b</think> 72", 0.0),                                  # nested open tag
    ("sure! <think>a</think> 72", 0.0),                                     # text before the block
    ("<think>a</think> 72 </think>", 0.0),
])
def test_format_reward(response, value):
    assert _call("format_reward", response) == value


def test_length_penalty_by_hand():
    assert _call("length_penalty", "x" * 400) == 0.0                         # free up to 400 characters
    assert _call("length_penalty", "x" * 1200) == pytest.approx(-0.25)      # (1200 - 400) / 1600 * 0.5
    assert _call("length_penalty", "x" * 5000) == pytest.approx(-0.5)       # capped
    custom = make_length_penalty(free_chars=10, max_chars=20, scale=1.0)
    assert custom("p", "x" * 15) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="free_chars < max_chars"):
        make_length_penalty(free_chars=20, max_chars=10)


def test_the_module_docstring_examples_hold():
    assert doctest.testmod(reasoning).failed == 0
