"""Tensor parallelism: the rank group (group.py), the step hand-off from rank 0 to the other
ranks (step_channel.py), and the worker process of a rank > 0 (worker.py)."""
