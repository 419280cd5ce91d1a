"""Run under mpiexec by test_comm_backend.py: exercises MPIBackend on every rank.

Usage: mpi_comm_backend_main.py OUT_DIR. Each rank writes OUT_DIR/rank<r>.json for the test
to check (separate files, so the ranks' output cannot interleave).
"""

import json
import os
import sys

from fusedcomm.runtime.comm_backend import CommBackend, MPIBackend, allgather_bytes, mpi_barrier


def main() -> None:
    comm = MPIBackend()
    rank, size = comm.Get_rank(), comm.Get_size()
    token = os.urandom(8).hex()
    out = {
        "rank": rank,
        "size": size,
        "is_backend": isinstance(comm, CommBackend),
        "raw_is_backend": isinstance(comm.comm, CommBackend),
        "token": token,
        "gathered": comm.allgather({"rank": rank, "token": token}),
        "bytes": [b.hex() for b in allgather_bytes(comm, bytes([rank, 7 * rank + 1]))],
        "bcast": comm.bcast({"from": rank, "token": token}, root=size - 1),
    }
    comm.barrier()
    single = comm.Split(rank, 0)
    out["single"] = [single.Get_rank(), single.Get_size(), single.allgather(rank)]
    rev = comm.Split(0, -rank)
    out["reversed"] = [rev.Get_rank(), rev.Get_size(), rev.allgather(rank)]
    mpi_barrier()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
