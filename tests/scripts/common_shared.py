"""Large common data, captured arrays, items and results: values, read-only-ness, where the pages
live, and that nothing stays mapped or named after each map / pool / error / cancellation.

Prints one JSON line of observations; tests/mpi/test_common_mpi.py checks them. Runs serially
and under `python -m mpimap` (collective mode has its own script, common_collective.py).
"""

import dataclasses
import functools
import json
import os
import time

import numpy as np

import mpimap
from mpimap import _nodeshare, _shm

MIB = 1 << 20


class Holder:  # a script class: common goes through dill, its arrays still out-of-band
    def __init__(self, arr):
        self.arr = arr


@dataclasses.dataclass
class Grid:
    values: np.ndarray
    name: str


def backing(a):
    """(path of the mapping that holds a's data, its permissions) in this process."""
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return (parts[5].strip() if len(parts) > 5 else ""), parts[1]
    return "", ""


def describe(a):
    path, perms = backing(a)
    try:
        a.flat[0] = a.flat[0]
        write = "ok"
    except ValueError as exc:
        write = "ValueError: " + str(exc)
    return {"sum": float(np.asarray(a, dtype=np.float64).sum()), "shape": list(a.shape),
            "writeable": bool(a.flags.writeable), "write": write, "path": path, "perms": perms}


def where(_i):
    t = mpimap.task()
    return t.rank, os.getpid(), t.node


def look(_i, c):
    t = mpimap.task()
    return {"rank": t.rank, "node": t.node, "stats": dict(_nodeshare.STATS),
            "grid": describe(c["grid"]), "list0": describe(c["list"][0]),
            "small": describe(c["list"][1]), "fortran": describe(c["tuple"][0]),
            "holder": describe(c["obj"].arr), "dc": describe(c["dc"].values),
            "dc_name": c["dc"].name, "dict_write": _try(lambda: c.__setitem__("x", 1))}


def _try(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return type(exc).__name__


def keep(arr):
    global KEPT
    KEPT = arr


def from_init(_i):
    path, perms = backing(KEPT)
    return mpimap.task().rank, float(KEPT.sum()), path, perms


def echo_big(x):
    return x * 2  # an item array bigger than MPIMAP_MAX_MESSAGE comes back doubled


def mapped_anywhere(pids):
    """pid -> number of mpimap segments (memfd or /dev/shm file) it still maps."""
    out = {}
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            out[pid] = sum(("/memfd:mpimap-" in line or "/dev/shm/mpimap-" in line)
                           for line in f)
    return out


def released(pids, deadline=15.0):
    """Wait until no rank maps a segment; True if that happened (workers drop asynchronously)."""
    end = time.monotonic() + deadline
    while True:
        left = mapped_anywhere(pids)
        if not any(left.values()):
            return True
        if time.monotonic() > end:
            return left
        time.sleep(0.1)


def main():
    out = {"mode": "serial"}
    info = mpimap.pmap(where, range(8), chunksize=1)
    ranks = sorted({r for r, _p, _n in info})
    pids = sorted({p for _r, p, _n in info} | {os.getpid()})
    out["ranks"] = ranks
    nw = len(ranks)

    grid = np.arange(3 * MIB // 8, dtype=np.float64)            # 3 MiB
    ints = np.arange(2 * MIB // 4, dtype=np.int32)               # 2 MiB
    small = np.arange(100, dtype=np.float64)                     # 800 B: copied per rank
    fortran = np.asfortranarray(np.arange(600 * 700, dtype=np.float64).reshape(600, 700))
    common = {"grid": grid, "list": [ints, small], "tuple": (fortran,),
              "obj": Holder(np.full(MIB // 8 * 2, 7.0)), "dc": Grid(np.ones(MIB // 4), "g")}
    # 1. per-map common: values, read-only, where it lives
    out["look"] = mpimap.pmap(look, range(nw), common=common, chunksize=1)
    out["expected"] = {"grid": float(grid.sum()), "list0": float(ints.sum()),
                       "small": float(small.sum()), "fortran": float(fortran.sum()),
                       "holder": 7.0 * (MIB // 8 * 2), "dc": float(MIB // 4)}
    out["caller_writeable"] = bool(grid.flags.writeable)
    out["released_after_map"] = released(pids)

    # 2. items and results bigger than MPIMAP_MAX_MESSAGE (pieces), out-of-band both ways
    items = [np.full(300_000, float(i)) for i in range(3)]       # 2.4 MB each
    back = mpimap.pmap(echo_big, items, chunksize=1)
    out["items_ok"] = all(np.array_equal(b, a * 2) for a, b in zip(items, back))

    # 3. arrays the function captures: shared, copy-on-write, private per rank
    captured = np.arange(MIB // 2, dtype=np.float64)             # 4 MiB

    def closure(_i):
        before = float(captured[0])
        captured[0] = 1000.0 + mpimap.task().rank                # a private page, on this rank
        path, perms = backing(captured)
        return mpimap.task().rank, before, float(captured[0]), float(captured[1:].sum()), \
            path, perms

    out["closure"] = mpimap.pmap(closure, range(nw), chunksize=1)
    out["closure_expected"] = float(captured[1:].sum())
    out["caller_captured0"] = float(captured[0])

    def scaled(k, arr, _i):
        path, perms = backing(arr)
        return mpimap.task().rank, float(arr.sum()) * k, path, perms

    part = functools.partial(scaled, 2.0, np.ones(MIB // 4))     # 2 MiB
    out["partial"] = mpimap.pmap(part, range(nw), chunksize=1)
    out["partial_expected"] = 2.0 * (MIB // 4)
    out["released_after_code"] = released(pids)  # large captured data: held for its map only

    # 4. Pool(common=...): one copy for every map of the pool, released at close
    table = np.full(MIB // 4, 5.0)

    def pooled(_i, c):  # reads the pool's common data and a captured array
        return mpimap.task().rank, backing(c)[0], float(c.sum()), backing(table)[0], \
            float(table.sum())

    with mpimap.Pool(common=np.full(MIB // 2, 3.0)) as pool:
        first = pool.map(pooled, range(nw), chunksize=1)
        second = pool.map(pooled, range(nw), chunksize=1)
        out["held_between_pool_maps"] = released(pids, deadline=0.5) is not True
    out["pool"] = {"first": first, "second": second, "expected": 3.0 * (MIB // 2),
                   "table": 5.0 * (MIB // 4)}
    out["released_after_pool"] = released(pids)

    # 4b. a Pool initializer's large arguments: once per node, copy-on-write like captured data
    with mpimap.Pool(initializer=keep, initargs=(np.full(MIB // 4, 4.0),)) as pool:
        out["init"] = pool.map(from_init, range(nw), chunksize=1)
    out["init_expected"] = 4.0 * (MIB // 4)
    out["released_after_init_pool"] = released(pids)

    # 5. a task raising: the error arrives, and the memory goes
    def boom(i, c):
        if i == 1:
            raise KeyError("boom with common")
        return float(c[0])

    try:
        mpimap.pmap(boom, range(nw + 1), common=np.zeros(MIB // 4), chunksize=1)
        out["error"] = "not raised"
    except KeyError as exc:
        out["error"] = str(exc)
    out["released_after_error"] = released(pids)

    # 6. leaving an imap early cancels the map and frees its common data
    it = mpimap.imap(lambda i, c: (time.sleep(0.05), float(c[i]))[1], range(40),
                     common=np.arange(MIB // 4, dtype=np.float64), chunksize=1)
    out["imap_first"] = [next(it), next(it)]
    it.close()
    out["released_after_cancel"] = released(pids)
    out["leftovers"] = _shm.leftovers()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
