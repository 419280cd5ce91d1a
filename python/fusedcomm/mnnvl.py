"""The communication-backend names under the sub-module path engines import them from
(``<package>.mnnvl``): the same objects as at the top level. ``MnnvlConfig.comm_backend`` is
also how :class:`~fusedcomm.MoeAlltoAll` can be told which group exchanges its memory handles."""

from .runtime.comm_backend import CommBackend, MnnvlConfig, MPIBackend, TorchDistBackend

__all__ = ["CommBackend", "MPIBackend", "MnnvlConfig", "TorchDistBackend"]
