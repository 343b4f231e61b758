"""`python -m rlhf_cli <stage> ...` (what torchrun launches)."""

from rlhf_cli.training import signals

signals.exit_at_once_on_sigint()  # before the imports below: Ctrl-C from here on is one line, exit 130

from rlhf_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
