"""Plain mpiexec: rank 1 raises outside any map while the others wait in the next collective."""
from mpi4py import MPI

import mpimap

rank = MPI.COMM_WORLD.Get_rank()
mpimap.pmap(abs, range(4))
if rank == 1:
    raise KeyError("rank 1 failed outside pmap")
MPI.COMM_WORLD.Barrier()
mpimap.pmap(abs, range(4))
print("should not get here", rank)
