"""One bundle-staging measurement in one MPI job; prints ``RESULT {json}`` on rank 0.

    python -m mpimap bundle_bench.py mpimap CASE DATA_DIR MAPS   (module mode; MAPS: 1 or 2)
    python bundle_bench.py raw CASE DATA_DIR EXTRACT_DIR         (plain mpi4py, every rank)

CASE is a folder of DATA_DIR ("big": one 1 GiB file; "small": 10,000 files of 10 KB).

mpimap: the time of ``pmap(probe, one item per worker, files=[CASE])`` -- rank 0 resolving,
hashing (unless known) and publishing on its node, asking each node's stager, sending to the
nodes that miss it, every worker switching to the bundle, and a task per worker that checks the
files are there. With MAPS=2 the same map runs again in the same process (all known: a hit).

raw: what a script would do by hand -- rank 0 reads every file into one buffer, ``Bcast`` to
every rank (pieces of 1 GiB), then the first rank of each node writes the files into a
node-local folder; the time ends at a barrier after the writes. No hashing, no verification, no
cache.
"""

from __future__ import annotations

import json
import os
import sys
import time


def probe(case):
    if case == "big":
        return os.path.getsize("big/big.bin")
    return len(os.listdir("small"))


def run_mpimap(case, data, maps):
    import mpimap
    from mpimap import _runtime

    os.chdir(data)
    engine = _runtime._state.engine
    n = engine.nworkers
    out = {"ranks": n + 1, "nodes": len({w.info.node for w in engine.workers.values()} |
                                        {os.environ.get("SLURMD_NODENAME") or os.uname()[1]}),
           "seconds": [], "sent": []}
    for _ in range(maps):
        t0 = time.perf_counter()
        seen = mpimap.pmap(probe, [case] * n, files=[case], chunksize=1)
        out["seconds"].append(time.perf_counter() - t0)
        rec = engine.bundles.log[-1]["nodes"]
        out["sent"].append({node: v["sent"] for node, v in rec.items()})
        assert len(set(seen)) == 1 and seen[0] > 0, seen
    print("RESULT " + json.dumps(out), flush=True)


def run_raw(case, data, extract):
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = comm.Get_rank()
    name = os.environ.get("SLURMD_NODENAME") or MPI.Get_processor_name()
    comm.Barrier()
    t0 = time.perf_counter()
    if rank == 0:
        root = os.path.join(data, case)
        files = []
        for dirpath, _dirs, names in os.walk(root):
            for n in sorted(names):
                p = os.path.join(dirpath, n)
                files.append((os.path.relpath(p, data), os.path.getsize(p)))
        total = sum(s for _f, s in files)
        buf = np.empty(total, dtype=np.uint8)
        off = 0
        for rel, size in files:
            with open(os.path.join(data, rel), "rb", buffering=0) as fh:
                fh.readinto(memoryview(buf[off:off + size]))
            off += size
    else:
        files = None
    files = comm.bcast(files, root=0)
    total = sum(s for _f, s in files)
    if rank != 0:
        buf = np.empty(total, dtype=np.uint8)
    piece = 1 << 30
    for off in range(0, total, piece):
        comm.Bcast([buf[off:off + piece], MPI.BYTE], root=0)
    if node.Get_rank() == 0:
        dest = os.path.join(extract, name)
        off = 0
        for rel, size in files:
            p = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as fh:
                fh.write(memoryview(buf[off:off + size]))
            off += size
    comm.Barrier()
    seconds = time.perf_counter() - t0
    # what each node received: the whole buffer once per rank on it (rank 0 already has it)
    per_node = comm.gather((name, 0 if rank == 0 else total), root=0)
    if rank == 0:
        got: dict = {}
        for n, b in per_node:
            got[n] = got.get(n, 0) + b
        print("RESULT " + json.dumps({"ranks": comm.Get_size(), "nodes": len(got),
                                      "seconds": [seconds], "sent": [got]}), flush=True)


if __name__ == "__main__":
    tool, case, data = sys.argv[1:4]
    if tool == "mpimap":
        run_mpimap(case, data, int(sys.argv[4]))
    else:
        run_raw(case, data, sys.argv[4])
