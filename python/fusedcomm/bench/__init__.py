"""Benchmarks behind ``fusedcomm bench``; each times ours beside NCCL in the same run."""
