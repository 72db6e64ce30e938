"""Benchmarks of the messager hot path and of the send-path barrier cost (``python benchmarks/run.py``)."""
