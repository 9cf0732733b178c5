"""A worker dies in the first map; rank 0 reports it and maps again on the survivors.

Usage: survive.py exit|kill
"""
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
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x


if __name__ == "__main__":
    try:
        mpimap.pmap(victim, range(12), chunksize=1)
        print("NO ERROR")
    except mpimap.WorkerLostError as exc:
        print(f"LOST {type(exc).__name__}: {exc}", flush=True)
    print("SURVIVORS", mpimap.pmap(abs, [-1, -2, -3]), flush=True)
