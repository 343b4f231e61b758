"""The embedded reasoning task: chains of mod-10 steps, checked by a rule.

    prompt:     "Solve mod 10: 7+2-3+1\\n"
    completion: "7+2=9. 9-3=6. 6+1=7. Answer: 7"

Each step applies one operation (+1..+3 or -1..-3, mod 10) to the running
value, so a tiny model can learn every step. The SFT demonstrations are
imperfect on purpose: in a subtraction step the demonstrator slips and adds
instead with probability ``SLIP_PROB`` (a consistent, plausible mistake), so
SFT learns the format and both behaviours, greedy decoding after SFT is mostly
wrong on subtractions, and RL with the rule reward has room to fix it. The
rule (:func:`correctness_reward`) is the verifiable reward; the held-out split
uses prompts that never appear in training.
"""

from __future__ import annotations

import random
import re

ANSWER_PREFIX = "Answer: "
SLIP_PROB = 0.6
MIN_STEPS, MAX_STEPS = 3, 3
OPERAND_RANGE = (1, 3)
_STEP_RE = re.compile(r"(\d)([+-])(\d)=(\d)")


def _apply(value: int, op: str, operand: int) -> int:
    return (value + operand) % 10 if op == "+" else (value - operand) % 10


def sample_problem(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    n_steps = rng.randint(MIN_STEPS, MAX_STEPS)
    start = rng.randint(0, 9)
    ops = [(rng.choice("+-"), rng.randint(*OPERAND_RANGE)) for _ in range(n_steps)]
    return start, ops


def format_prompt(start: int, ops: list[tuple[str, int]]) -> str:
    return f"Start at {start}." + "".join(f" {'add' if op == '+' else 'sub'} {b}." for op, b in ops) + "\n"


def true_answer(start: int, ops: list[tuple[str, int]]) -> int:
    value = start
    for op, b in ops:
        value = _apply(value, op, b)
    return value


def worked_answer(start: int, ops, slips: list[bool] | None = None, wrong_final: int | None = None) -> str:
    """Step-by-step text; ``slips[i]`` makes step i add instead of subtract."""
    value, steps = start, []
    for i, (op, b) in enumerate(ops):
        slipped = slips is not None and slips[i] and op == "-"
        new = _apply(value, "+" if slipped else op, b)
        steps.append(f"{value}{op}{b}={new}")
        value = new
    final = value if wrong_final is None else wrong_final
    return ". ".join(steps) + f". {ANSWER_PREFIX}{final}"


def _problems(n: int, seed: int, split: str, exclude: set[str] | None = None):
    rng = random.Random(f"{seed}-{split}")
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        start, ops = sample_problem(rng)
        prompt = format_prompt(start, ops)
        if exclude is not None and prompt in seen:
            continue  # held-out prompts never appear in training
        out.append((rng, start, ops, prompt))
    return out


def _split_problems(n: int, seed: int, split: str, n_eval: int):
    if split == "eval":
        return _problems(n, seed, "eval")
    held_out = {p for *_, p in _problems(n_eval, seed, "eval")}
    return _problems(n, seed, "train", exclude=held_out)


def sft_rows(n: int, seed: int = 0, split: str = "train", n_eval: int = 200) -> list[dict]:
    """prompt/completion rows; completions carry the demonstrator's slips."""
    rows = []
    for rng, start, ops, prompt in _split_problems(n, seed, split, n_eval):
        slips = [rng.random() < SLIP_PROB for _ in ops]
        rows.append({"prompt": prompt, "completion": worked_answer(start, ops, slips),
                     "answer": str(true_answer(start, ops))})
    return rows


def preference_rows(n: int, seed: int = 0, split: str = "train", n_eval: int = 200) -> list[dict]:
    """prompt/chosen/rejected: a correct worked answer against a plausible wrong one."""
    rows = []
    for rng, start, ops, prompt in _split_problems(n, seed, split, n_eval):
        chosen = worked_answer(start, ops)
        kind = rng.choice(["slip", "slip", "final", "format"])
        subs = [i for i, (op, _) in enumerate(ops) if op == "-"]
        if kind == "slip" and subs:
            slips = [False] * len(ops)
            for i in subs:
                slips[i] = True
            slips = [s and (rng.random() < 0.5 or i == subs[0]) for i, s in enumerate(slips)]
            rejected = worked_answer(start, ops, slips)
        elif kind == "format":
            rejected = chosen.replace(ANSWER_PREFIX, rng.choice(["", "Answer ", "answer: "]))
        else:
            right = true_answer(start, ops)
            rejected = worked_answer(start, ops, wrong_final=(right + rng.randint(1, 9)) % 10)
        if rejected == chosen:  # e.g. a slip that changes nothing: fall back to a wrong final number
            rejected = worked_answer(start, ops, wrong_final=(true_answer(start, ops) + 5) % 10)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "answer": str(true_answer(start, ops))})
    return rows


def prompt_rows(n: int, seed: int = 0, split: str = "train", n_eval: int = 200) -> list[dict]:
    """prompt rows for RL; `answer` is passed to the reward rule."""
    return [{"prompt": p, "answer": str(true_answer(s, o))} for _, s, o, p in _split_problems(n, seed, split, n_eval)]


def extract_answer(response: str) -> str | None:
    if ANSWER_PREFIX not in response:
        return None
    return response.rsplit(ANSWER_PREFIX, 1)[1].strip()


def correctness_reward(prompt: str, response: str, answer=None, **row) -> float:
    """Verifiable reward: 1.0 when the text after the last 'Answer: ' equals the row's answer."""
    if answer is None:
        raise ValueError("the row has no 'answer' field to check against")
    return 1.0 if extract_answer(response) == str(answer).strip() else 0.0


def step_correctness_reward(prompt: str, response: str, answer=None, **row) -> list[tuple[int, float]]:
    """Process reward: for each written step 'a+b=c', (end offset, +0.2 if correct else -0.2),
    plus (end, 1.0) for a correct final answer. Each value lands on its step's last token."""
    values = []
    for m in _STEP_RE.finditer(response):
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        values.append((m.end(), 0.2 if _apply(a, op, b) == c else -0.2))
    values.append((len(response), correctness_reward(prompt, response, answer)))
    return values
