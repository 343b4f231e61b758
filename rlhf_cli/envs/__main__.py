"""python -m rlhf_cli.envs list | write DIR [--seed N]: the shipped environments and their files."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf_cli.envs import calculator, guess, modsteps
from rlhf_cli.envs.base import write

TASKS = {"modsteps": modsteps.TASK, "guess": guess.TASK, "calculator": calculator.TASK}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.envs")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list")
    w = sub.add_parser("write")
    w.add_argument("directory")
    w.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, task in TASKS.items():
        if args.command == "list":
            print(f"{name:11} env.name={task.name}  {task.summary}")
        else:
            print(write(task, Path(args.directory) / name, args.seed))


if __name__ == "__main__":
    main()
