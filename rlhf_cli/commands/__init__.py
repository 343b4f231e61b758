"""The command-line tools besides the stages: rlhf eval, validate, plot, generate, label; sweeps, help and completion."""
