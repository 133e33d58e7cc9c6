"""Serving a converted checkpoint with stock vLLM: memory planner, launcher scripts, smoke test, recipes."""
