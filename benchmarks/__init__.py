"""Benchmarks of one optimizer step: time, XLA temporaries, state bytes.

Run with ``python -m benchmarks.run``.
"""
