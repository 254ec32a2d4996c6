"""Benchmarks run by `make bench`: figures printed side by side with a baseline from the same run."""
