"""Large common data across nodes: what each rank sees, which segment backs it, who received it.

Usage: common_nodes.py OUT.json   (rank 0 writes the observations; tests/slurm checks them)

Every worker reports, for per-map common data, a Pool's common data and an array the mapped
function captures: the values, whether it is writeable, the mapping that holds it (a memfd or
/dev/shm name, the same for every rank of a node), and its own counters (bytes received for its
node over MPI, segments created / mapped). After each phase a map asks every worker how many
segments it still maps: frames are handled in order, so the DROP of the previous map has been
handled by then.
"""
import json
import os
import sys

import numpy as np

import mpimap
from mpimap import _nodeshare, _shm

MIB = 1 << 20


def backing(a):
    addr = a.__array_interface__["data"][0]
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                path = parts[5].strip() if len(parts) > 5 else ""
                return path.removesuffix(" (deleted)"), parts[1]
    return "", ""


def writes(a):
    try:
        a[0] = a[0]
        return "ok"
    except ValueError:
        return "ValueError"


def where(_i):
    t = mpimap.task()
    return t.rank, t.node


def look(_i, c):
    t = mpimap.task()
    path, perms = backing(c["grid"])
    return {"rank": t.rank, "node": t.node, "path": path, "perms": perms,
            "same_segment": backing(c["more"][0])[0] == path,
            "sum": float(c["grid"].sum()) + float(c["more"][0].sum()),
            "writeable": bool(c["grid"].flags.writeable), "write": writes(c["grid"]),
            "stats": dict(_nodeshare.STATS)}


def segments_here(_i):
    with open("/proc/self/maps") as f:
        n = sum(("/memfd:mpimap-" in line or "/dev/shm/mpimap-" in line) for line in f)
    return mpimap.task().rank, n


def main():
    out_path = sys.argv[1]
    info = mpimap.pmap(where, range(8), chunksize=1)
    nw = len({r for r, _n in info})
    out = {"rank0_node": os.environ.get("SLURMD_NODENAME"),
           "where": sorted(set(info))}
    grid = np.arange(3 * MIB // 8, dtype=np.float64)
    more = np.full(MIB // 8 * 2, 2.0)
    out["common"] = mpimap.pmap(look, range(nw), common={"grid": grid, "more": [more]},
                                chunksize=1)
    out["common_expected"] = float(grid.sum()) + float(more.sum())
    out["after_common"] = sorted(mpimap.pmap(segments_here, range(nw), chunksize=1))

    table = np.arange(MIB // 4, dtype=np.float64)   # captured by the mapped function

    def pooled(_i, c):
        t = mpimap.task()
        cpath, cperms = backing(c)
        tpath, tperms = backing(table)
        return [t.rank, t.node, cpath, cperms, float(c.sum()), tpath, tperms, float(table.sum()),
                writes(c), writes(table)]

    with mpimap.Pool(common=np.full(MIB // 2, 3.0)) as pool:
        out["pool1"] = sorted(pool.map(pooled, range(nw), chunksize=1))
        out["pool2"] = sorted(pool.map(pooled, range(nw), chunksize=1))
    out["pool_expected"] = [3.0 * (MIB // 2), float(table.sum())]
    out["after_pool"] = sorted(mpimap.pmap(segments_here, range(nw), chunksize=1))
    out["leftovers"] = _shm.leftovers()
    with open(out_path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(out_path + ".tmp", out_path)
    print("common nodes ok", flush=True)


if __name__ == "__main__":
    main()
