"""Ranks record SIGTERM (scancel) and exit; a rank still running afterwards is a leak.

Usage: term.py MARKDIR TOKEN   (TOKEN appears in every rank's command line, for pgrep)
"""
import os
import signal
import sys
import time

import mpimap

MARKDIR = sys.argv[1]


def on_term(signum, _frame):
    rank = os.environ.get("PMI_RANK") or os.environ.get("PMIX_RANK") or \
        os.environ.get("SLURM_PROCID") or "x"
    open(os.path.join(MARKDIR, f"term.rank{rank}.{os.getpid()}"), "w").close()
    if rank == "0":
        # Let the other ranks' SIGTERM arrive first (each node's slurmstepd sends its own);
        # otherwise they may see rank 0 gone and stop before their handler runs.
        time.sleep(1.0)
    os._exit(0)


def install():
    signal.signal(signal.SIGTERM, on_term)


if __name__ == "__main__":
    install()
    with mpimap.Pool(initializer=install) as pool:
        pool.map(abs, range(8), chunksize=1)
        open(os.path.join(MARKDIR, "ready"), "w").close()
        time.sleep(300)
