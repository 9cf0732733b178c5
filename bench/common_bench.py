"""One measurement of the common-data benchmarks, for one tool; prints a JSON line on rank 0.

    <launcher> common_bench.py TOOL time SIZE_MIB REPS
    <launcher> common_bench.py TOOL memory SIZE_MIB

TOOL: mpimap (under python -m mpimap) | raw (np.empty + comm.Bcast, plain mpiexec) |
futures / futures-pkl5 (under python -m mpi4py.futures: MPIPoolExecutor(initializer=...), the
second with use_pkl5=True). bench/run_common.py launches every combination and writes
bench/RESULTS.md.

time: seconds from the call until every rank has read the whole array (one float per 4 KiB
page), allocation and first touch included on every side. Each repetition sends a fresh array
(made before the clock starts), so nothing is cached between repetitions.

memory: after every rank has touched the array (and still holds it), rank 0 reads the PSS of
every rank on the node (``/proc/<pid>/smaps_rollup``; PSS splits a shared page between the
processes that map it, so the sum counts it once), and each rank's peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

PAGE = 4096


def fresh(mib: int, seed: int) -> np.ndarray:
    a = np.empty((mib << 20) // 8)
    a[:] = seed  # touched by the caller, outside the clock
    return a


def touch(a) -> float:
    """Read every page once (one float per 4 KiB page)."""
    return float(a[::PAGE // 8].sum())


def proc_field(pid: int, path: str, key: str) -> int:
    with open(f"/proc/{pid}/{path}") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_of(pids) -> dict:
    return {str(p): {"pss": proc_field(p, "smaps_rollup", "Pss"),
                     "rss": proc_field(p, "status", "VmRSS"),
                     "hwm": proc_field(p, "status", "VmHWM")} for p in pids}


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or os.uname().nodename


def report(out: dict) -> None:
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------------------------

def _where(_i, _common=None):
    import mpimap

    t = mpimap.task()
    return t.rank, os.getpid(), node_name()


def _touch_common(_i, c):
    import mpimap

    return mpimap.task().rank, touch(c)


def run_mpimap(mode, mib, reps):
    import mpimap

    with mpimap.Pool() as pool:
        workers = pool.size
    if mode == "time":
        times = []
        for rep in range(reps):
            a = fresh(mib, rep + 1)
            t0 = time.perf_counter()
            got = mpimap.pmap(_touch_common, range(workers), common=a, chunksize=1)
            times.append(time.perf_counter() - t0)
            assert sorted(r for r, _s in got) == list(range(1, workers + 1)), got
            assert all(s == (rep + 1) * (a.size // (PAGE // 8)) for _r, s in got), got
            del a
        return {"seconds": times, "ranks": workers + 1}
    a = fresh(mib, 1)
    with mpimap.Pool(common=a) as pool:
        where = pool.map(_where, range(workers), chunksize=1)
        assert sorted(r for r, _p, _n in where) == list(range(1, workers + 1)), where
        got = pool.map(_touch_common, range(workers), chunksize=1)
        assert sorted(r for r, _s in got) == list(range(1, workers + 1)), got
        # every worker has touched the pool's common data and still holds it, idle: sample now
        me = node_name()
        nodes = {}
        for _r, pid, node in where + [(0, os.getpid(), me)]:
            nodes.setdefault(node, []).append(pid)
        mem = {node: memory_of(pids) for node, pids in nodes.items()}
    return {"nbytes": a.nbytes, "ranks": workers + 1, "rank0_node": me, "nodes": mem}


def run_raw(mode, mib, reps):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    n = (mib << 20) // 8
    if mode == "time":
        times = []
        for rep in range(reps):
            src = fresh(mib, rep + 1) if rank == 0 else None
            comm.Barrier()
            t0 = time.perf_counter()
            buf = src if rank == 0 else np.empty(n)
            comm.Bcast(buf, root=0)
            s = touch(buf)
            comm.Barrier()
            times.append(time.perf_counter() - t0)
            assert s == (rep + 1) * (n // (PAGE // 8))
            del buf, src
        return {"seconds": times, "ranks": comm.Get_size()} if rank == 0 else None
    buf = fresh(mib, 1) if rank == 0 else np.empty(n)
    comm.Bcast(buf, root=0)
    touch(buf)
    pids = comm.gather(os.getpid(), root=0)
    comm.Barrier()
    out = None
    if rank == 0:
        out = {"nbytes": buf.nbytes, "ranks": comm.Get_size(), "rank0_node": node_name(),
               "nodes": {node_name(): memory_of(pids)}}
    comm.Barrier()
    return out


DATA = None


def _init(a):
    global DATA
    DATA = a
    touch(a)


def run_futures(mode, mib, reps, pkl5):
    from mpi4py.futures import MPIPoolExecutor

    def start(a):
        ex = MPIPoolExecutor(initializer=_init, initargs=(a,), use_pkl5=pkl5)
        ex.bootup(wait=True)  # returns once every worker has run the initializer
        return ex

    if mode == "time":
        times = []
        for rep in range(reps):
            a = fresh(mib, rep + 1)
            t0 = time.perf_counter()
            ex = start(a)
            times.append(time.perf_counter() - t0)
            workers = ex.num_workers
            ex.shutdown()
            del a
        return {"seconds": times, "ranks": workers + 1}
    a = fresh(mib, 1)
    ex = start(a)
    # The workers are the other children of this rank's launcher process (one node).
    parent = os.getppid()
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        pids = [int(p) for p in f.read().split()]
    assert os.getpid() in pids and len(pids) == ex.num_workers + 1, pids
    out = {"nbytes": a.nbytes, "ranks": ex.num_workers + 1, "rank0_node": node_name(),
           "nodes": {node_name(): memory_of(pids)}}
    ex.shutdown()
    return out


def main():
    tool, mode, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    if tool == "mpimap":
        out = run_mpimap(mode, mib, reps)
    elif tool == "raw":
        out = run_raw(mode, mib, reps)
    elif tool in ("futures", "futures-pkl5"):
        out = run_futures(mode, mib, reps, tool == "futures-pkl5")
    else:
        raise SystemExit(f"unknown tool {tool}")
    if out is not None:
        out.update(tool=tool, mode=mode, mib=mib)
        report(out)


if __name__ == "__main__":
    main()
