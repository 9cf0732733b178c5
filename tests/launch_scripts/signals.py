"""Every rank installs a handler for SIG (default USR1) that drops a marker file in MARKDIR.

Usage: signals.py MARKDIR NRANKS [SIG]
Rank 0 maps once (so every worker has run the pool initializer), writes MARKDIR/ready, then
waits up to 60 s for NRANKS markers and exits 0 if they all came, 1 if not.
"""
import glob
import os
import signal
import sys
import time

import mpimap

MARKDIR = sys.argv[1]
SIG = getattr(signal, "SIG" + (sys.argv[3] if len(sys.argv) > 3 else "USR1"))


def _rank():
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return os.environ[var]
    return "x"


def mark(signum, _frame):
    name = f"marker.rank{_rank()}.{os.environ.get('SLURMD_NODENAME', 'nonode')}.{os.getpid()}"
    with open(os.path.join(MARKDIR, name), "w") as f:
        f.write(signal.Signals(signum).name)


def install():
    signal.signal(SIG, mark)


def where(_x):
    t = mpimap.task()
    return t.rank, t.node


if __name__ == "__main__":
    install()
    nranks = int(sys.argv[2])
    with mpimap.Pool(initializer=install) as pool:
        placed = sorted(set(pool.map(where, range(4 * nranks), chunksize=1)))
        print("workers:", placed, flush=True)
        open(os.path.join(MARKDIR, "ready"), "w").close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(glob.glob(os.path.join(MARKDIR, "marker.*"))) >= nranks:
                break
            time.sleep(0.1)
        markers = sorted(os.path.basename(p) for p in glob.glob(os.path.join(MARKDIR, "marker.*")))
        print("markers:", markers, flush=True)
    sys.exit(0 if len(markers) >= nranks else 1)
