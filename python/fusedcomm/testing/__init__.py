"""Helpers for testing fusedcomm: multi-rank process launching and MPI command lines."""
