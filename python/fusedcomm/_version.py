"""The package version, importable without loading the package (the jit/ wheel reads it)."""

__version__ = "0.1.0"
