"""A task kills its own process; rank 0 should report it and go on with the survivors."""
import ctypes
import os
import signal
import sys
import time

import mpimap

HOW = sys.argv[1]


def victim(x):
    if x == 5:
        if HOW == "exit":
            os._exit(3)
        elif HOW == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif HOW == "segv":
            ctypes.string_at(0)
    time.sleep(0.05)
    return x


t0 = time.monotonic()
try:
    mpimap.pmap(victim, range(12), chunksize=1)
    print("NO ERROR")
except mpimap.WorkerLostError as exc:
    print(f"LOST rank={exc.rank} items={exc.items} after={time.monotonic() - t0:.1f}s")
    print("MESSAGE", exc)
print("SURVIVORS", mpimap.pmap(abs, [-1, -2, -3]), flush=True)
