"""Benchmarks of the messager hot path and of the send-path barrier cost (``python -m benchmarks.run``)."""
