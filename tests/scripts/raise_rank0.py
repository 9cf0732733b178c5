"""The script raises on rank 0; optionally while a worker is stuck in a long task."""
import sys
import time

import mpimap


def nap(x):
    time.sleep(x)
    return x


print(mpimap.pmap(abs, [-1, -2]), flush=True)
if sys.argv[1:] == ["busy"]:
    it = mpimap.imap(nap, [0.0, 600.0], chunksize=1)
    next(it)  # a worker is now inside a 10-minute task
raise RuntimeError("the script failed on purpose")
