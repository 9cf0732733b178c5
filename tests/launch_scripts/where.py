"""pmap over N items; rank 0 writes what ran where to OUT (JSON) and prints a summary.

Usage: where.py N OUT.json [ARGS...]  (extra ARGS are echoed back, to check quoting)
"""
import json
import os
import sys

import mpimap


def where(x):
    t = mpimap.task()
    scratch = os.environ.get("SLURM_TMPDIR")
    return {"x": x, "square": x * x, "rank": t.rank, "node": t.node,
            "slurmd_nodename": os.environ.get("SLURMD_NODENAME"), "slurm_tmpdir": scratch,
            "slurm_tmpdir_exists": bool(scratch) and os.path.isdir(scratch)}


if __name__ == "__main__":
    n, out = int(sys.argv[1]), sys.argv[2]
    results = mpimap.pmap(where, range(n), chunksize=1)
    doc = {"results": results, "argv": sys.argv[3:], "cwd": os.getcwd(),
           "driver_node": os.environ.get("SLURMD_NODENAME"),
           "nworkers": len({r["rank"] for r in results})}
    with open(out + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(out + ".tmp", out)
    print("squares ok:", [r["square"] for r in results] == [x * x for x in range(n)])
    print("ranks:", sorted({(r["rank"], r["node"]) for r in results}))
