"""Benchmark scripts (``make bench``): numbers, not pass/fail tests."""
