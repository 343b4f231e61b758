"""rlhf: post-train language models with SFT, reward models and REINFORCE / A2C / PPO."""

__version__ = "0.1.0"
