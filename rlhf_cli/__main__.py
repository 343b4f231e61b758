"""`python -m rlhf_cli <stage> ...` (what torchrun launches)."""

from rlhf_cli.cli import main

if __name__ == "__main__":
    main()
