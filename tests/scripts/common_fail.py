"""The node's shared copy cannot be made (here: a full /dev/shm, simulated on rank 0, which is
its node's receiver): the map fails with an error that says so and names the fix; the next works."""
import errno
import json

import numpy as np

import mpimap
from mpimap import _shm


def first(_i, c):
    return float(c[0])


class Full(_shm.Segment):
    def __init__(self, kind, size, name=None):
        raise OSError(errno.ENOSPC, "No space left on device")


real, _shm.Segment = _shm.Segment, Full
out = {}
try:
    mpimap.pmap(first, range(2), common=np.zeros(1 << 18), chunksize=1)
    out["error_type"] = "none"
except Exception as exc:
    out["error_type"], out["error"] = type(exc).__name__, str(exc)
_shm.Segment = real
out["after"] = mpimap.pmap(first, range(2), common=np.full(1 << 18, 2.0), chunksize=1)
out["leftovers"] = _shm.leftovers()
print(json.dumps(out), flush=True)
