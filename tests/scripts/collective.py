"""Run with plain `mpiexec -n N python collective.py`: every rank calls the maps."""
import json

from mpi4py import MPI

import mpimap

rank = MPI.COMM_WORLD.Get_rank()
data = MPI.COMM_WORLD.bcast({"scale": 5} if rank == 0 else None)  # the user's own MPI call
res = mpimap.pmap(lambda x: x * data["scale"], range(10))
with mpimap.Pool(common=2) as pool:
    pres = pool.map(lambda x, c: x + c, range(5))
it = list(mpimap.imap(abs, [-1, -2, -3]))
mine = {"rank": rank, "pmap": res, "pool": pres, "imap": it, "root": mpimap.is_root()}
rows = MPI.COMM_WORLD.gather(mine)  # every rank came back from the maps
if rank == 0:
    print(json.dumps(rows), flush=True)
