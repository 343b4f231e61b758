"""The real-model task suite: three chat tasks for SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct).

    python scripts/suite_pretrained.py --runs runs/suite-pretrained     # sft -> train-rm -> rl on each

Each is a :class:`~rlhf_cli.tasks.base.Task` (chat=True) written by the same
``base.write`` as the from-scratch suite (six JSONL files, 100 held-out
prompts no training file holds), sized for a CPU budget (1,000 SFT rows,
2,000 preference pairs, 500 RL prompts), with prompts of 30-50 tokens as the
chat template renders them (its default system turn alone is 30) and answers
of a few words:

- ``chatsum``: two-digit addition, the number alone: a verifiable rule.
- ``wordlimit``: name N things of a category within a word limit: a format rule.
- ``politeness``: answer first, then one follow-up offer: a style only the
  preference pairs carry. ``RM_ONLY``: RL on it runs with the reward model
  alone (its ``reward`` is ``None``); its ``correct`` is the hidden rule that
  measures the held-out result.

``TUNING`` may be used to choose defaults for pretrained models; ``HELD_OUT``
never is (docs/suite-pretrained.md says why ``wordlimit``).
"""

from __future__ import annotations

from rlhf_cli.tasks.base import Task
from rlhf_cli.tasks.pretrained import chatsum, politeness, wordlimit

TASKS: dict[str, Task] = {t.name: t for t in (chatsum.TASK, politeness.TASK, wordlimit.TASK)}
TUNING = ("chatsum", "politeness")  # defaults for pretrained models may be chosen on these
HELD_OUT = ("wordlimit",)  # never used to choose anything: the check that those defaults were not fitted
RM_ONLY = ("politeness",)  # no rule reward: RL runs with the reward model alone; `correct` is for measurement only
MODEL = "models/SmolLM2-135M-Instruct"  # the base model of every stage, relative to the repository root

__all__ = ["TASKS", "TUNING", "HELD_OUT", "RM_ONLY", "MODEL", "Task"]
