"""Rollout engines: the lean and HF decoders, vLLM."""
