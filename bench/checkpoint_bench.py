"""One checkpoint benchmark, run as an MPI job; prints a JSON line on rank 0.

    mpiexec -n 3 python -m mpimap checkpoint_bench.py EXPERIMENT REPS FOLDER [DIVISOR]

EXPERIMENT: small (10,000 tasks of 1 ms CPU work returning a float) | big (1,000 tasks of 50 ms
CPU work returning a 1 MiB float64 array). On a warm pool, each repetition maps once without and
once with ``checkpoint=`` (a fresh file each time; the order alternates between repetitions, so
drift in the machine's load hits both alike). Per map: the makespan (the map call), rank 0's CPU
time, the CPU time of every rank (all on this node: /proc/PID/stat; the workers' CPU is what other
processes' load cannot change), the bytes rank 0 handed to write() (/proc/self/io wchar) and the
load average. Finally one rerun of the finished checkpointed map (nothing to compute: every result
read back). bench/run_checkpoint.py launches it and writes bench/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import mpimap

EXPERIMENTS = {"small": (10_000, 0.001, False), "big": (1_000, 0.050, True)}
N, WORK, ARRAY = EXPERIMENTS[sys.argv[1] if len(sys.argv) > 1 else "small"]
N //= int(sys.argv[4]) if len(sys.argv) > 4 else 1   # a smoke test: fewer tasks


def cpu_work(seconds):
    """Busy for ``seconds`` of this thread's CPU time (not wall time: the machine is shared)."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


def task(x):
    cpu_work(WORK)
    return np.full(131072, float(x)) if ARRAY else x * 0.5


def wchar() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def job_cpu(pids) -> float:
    """CPU seconds (user + system) of these processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def load_average() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


def clean(path):
    for suffix in ("", ".journal", ".lock"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def measure(pool, path, pids):
    j0, w0, c0, t0 = job_cpu(pids), wchar(), time.process_time(), time.perf_counter()
    out = pool.map(task, range(N), checkpoint=path)
    t1, c1, w1, j1 = time.perf_counter(), time.process_time(), wchar(), job_cpu(pids)
    assert len(out) == N
    return t1 - t0, c1 - c0, w1 - w0, j1 - j0


def main():
    reps = int(sys.argv[2])
    folder = sys.argv[3]
    path = os.path.join(folder, f"bench-{sys.argv[1]}.h5")
    res = {f"{m}_{k}": [] for m in ("plain", "ckpt") for k in ("s", "cpu_s", "wchar",
                                                              "job_cpu_s")}
    res["loadavg"] = [load_average()]
    from mpimap import _runtime

    pids = [os.getpid()] + [i.pid for i in _runtime._state.hub.info.values()]
    with mpimap.Pool() as pool:
        pool.map(task, range(4 * pool.size))  # warm: function on the workers, timing known
        for r in range(reps):
            for mode in (("plain", "ckpt") if r % 2 == 0 else ("ckpt", "plain")):
                if mode == "ckpt":
                    clean(path)
                s, cpu, w, jc = measure(pool, path if mode == "ckpt" else None, pids)
                res[f"{mode}_s"].append(s)
                res[f"{mode}_cpu_s"].append(cpu)
                res[f"{mode}_wchar"].append(w)
                res[f"{mode}_job_cpu_s"].append(jc)
            res["loadavg"].append(load_average())
        res["file_bytes"] = os.path.getsize(path)
        t0 = time.perf_counter()
        out = pool.map(task, range(N), checkpoint=path)   # everything done: read back
        res["reread_s"] = time.perf_counter() - t0
        assert len(out) == N
        res["workers"] = pool.size
    clean(path)
    res.update(items=N, work_s=WORK, result_bytes=131072 * 8 if ARRAY else 8)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
