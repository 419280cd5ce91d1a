"""Prebuilt CUDA modules for fusedcomm; fusedcomm finds them here before starting a compiler."""

from pathlib import Path

try:
    from ._version import CUDA_VERSION, __version__
except ImportError:  # a source checkout, not a built wheel
    __version__ = "0+unbuilt"
    CUDA_VERSION = None

MODULE_DIR = str(Path(__file__).resolve().parent / "modules")
