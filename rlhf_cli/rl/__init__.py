"""The RL recipe's rollout side and its async actors."""
