"""A suite of small synthetic tasks, unlike each other and unlike the embedded one.

    python -m rlhf_cli.tasks list                 # the tasks, one line each
    python -m rlhf_cli.tasks write DIR            # every task's files under DIR/<task>/
    python scripts/suite.py --runs runs/suite     # sft -> train-rm -> rl on each (make suite)

Defaults are chosen (and learning claimed) on these tasks, not on the embedded
task alone (docs/suite.md). Each task is a :class:`~rlhf_cli.tasks.base.Task`:
a problem generator, the demonstrator that writes its SFT rows (with the task's
own kind of flaw: systematic slips, random noise, or too few rows), a plausible
wrong answer for preference pairs, and its rules by dotted path:
``<module>:reward`` (the RL reward: binary, partial credit or per-step process
rewards) and ``<module>:correct`` (exact match, the held-out accuracy).
``TUNING`` were used to choose defaults; ``HELD_OUT`` never were, and are
reported apart.

Files written per task (one JSON object per line, TRL column names):
sft_train / sft_eval (prompt/completion or messages), pairs_train / pairs_eval
(prompt/chosen/rejected), prompts_train / prompts_eval (prompt + answer).
Held-out prompts never appear in any training file.
"""

from __future__ import annotations

from rlhf_cli.tasks import addcarry, caesar, count, digitwords, linesum, maxof, sort3
from rlhf_cli.tasks.base import Task, rows, write

TASKS: dict[str, Task] = {t.name: t for t in (sort3.TASK, addcarry.TASK, digitwords.TASK, maxof.TASK,
                                               caesar.TASK, count.TASK, linesum.TASK)}
TUNING = ("sort3", "addcarry", "digitwords", "maxof")  # defaults were chosen on these
HELD_OUT = ("caesar", "count", "linesum")  # never used to choose anything: the check that defaults were not fitted

__all__ = ["TASKS", "TUNING", "HELD_OUT", "Task", "rows", "write"]
