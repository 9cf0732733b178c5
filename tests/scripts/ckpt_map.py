"""A checkpointed map for the MPI, kill and Slurm tests.

Usage: ckpt_map.py PATH N MARKDIR [SLEEP] [KIND]
Item x sleeps SLEEP seconds (default 0.02), leaves the marker file MARKDIR/<x>.<pid>.<random>
once it has computed x, and returns x / 2 (KIND=float, default) or a 320 kB array full of x
(KIND=array: rows written once and pointed at by the journal). Prints one JSON line at the end:
{"n": ..., "ok": every result right}.
"""
import json
import os
import sys
import time
import uuid

import numpy as np

import mpimap

PATH, N, MARKS = sys.argv[1], int(sys.argv[2]), sys.argv[3]
SLEEP = float(sys.argv[4]) if len(sys.argv) > 4 else 0.02
KIND = sys.argv[5] if len(sys.argv) > 5 else "float"


def expected(x):
    return np.full(40000, float(x)) if KIND == "array" else x / 2


def work(x):
    time.sleep(SLEEP)
    value = expected(x)
    open(os.path.join(MARKS, f"{x}.{os.getpid()}.{uuid.uuid4().hex[:8]}"), "w").close()
    return value


if __name__ == "__main__":
    out = mpimap.pmap(work, range(N), checkpoint=PATH)
    ok = len(out) == N and all(np.array_equal(v, expected(x)) for x, v in enumerate(out))
    print(json.dumps({"n": len(out), "ok": ok}), flush=True)
