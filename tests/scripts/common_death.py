"""A worker dies while rank 0 waits for it to map a shared copy: rank 0 stops waiting (its fd is
closed), reports the loss, and later maps with large common data still work (run under
`mpimap run`, so a rank's death is an ordinary exit)."""
import json
import os
import time

import numpy as np

import mpimap
from mpimap import _shm


def slow_then_die(i):
    if mpimap.task().rank == 1:
        time.sleep(1.5)
        os._exit(3)
    return i


def read(_i, c):
    return mpimap.task().rank, float(c[0])


def rank0_segment_fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "mpimap-" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
        except OSError:
            pass
    return out


out = {}
it = mpimap.imap_unordered(slow_then_die, range(2), chunksize=1)
next(it)                                  # rank 2 answered; rank 1 is still in its task
try:                                      # rank 0 makes its node's copy, waits for both acks
    mpimap.pmap(read, range(4), common=np.full(1 << 18, 1.0), chunksize=1)
except mpimap.WorkerLostError:
    pass
try:
    list(it)
    out["lost"] = "none"
except mpimap.WorkerLostError as exc:
    out["lost"] = f"WorkerLostError: {exc}"
out["rank0_fds_after_loss"] = rank0_segment_fds()
out["after"] = sorted({tuple(x) for x in mpimap.pmap(read, range(4), chunksize=1,
                                                      common=np.full(1 << 18, 3.0))})
out["survivors"] = sorted({r for r, _v in out["after"]})
out["leftovers"] = _shm.leftovers()
print(json.dumps(out), flush=True)
