"""python -m rlhf_cli.tasks write DIR [--seed N] [--only a,b]: every task's files under DIR/<task>/."""

from __future__ import annotations

import argparse

from rlhf_cli.tasks import TASKS, write


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.tasks", description=__doc__)
    parser.add_argument("command", choices=["write", "list"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(TASKS)
    for name in names:
        task = TASKS[name]
        if args.command == "list":
            print(f"{name:12s} {task.summary}")
        else:
            print(write(task, f"{args.directory}/{name}", args.seed))


if __name__ == "__main__":
    main()
