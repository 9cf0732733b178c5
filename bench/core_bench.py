"""One measurement of the core-map benchmarks, for one tool; prints a JSON line on rank 0.

    <launcher> core_bench.py TOOL EXPERIMENT [REPS]

TOOL: mpimap | futures (python -m mpi4py.futures) | schwimmbad | raw (mpi4py send/recv of
pickled chunks). EXPERIMENT: noop | noop-best (futures: search its best chunksize) | balance |
latency. bench/run_core.py launches every combination with the right launcher and writes
bench/RESULTS.md. Times cover the map call only (a warm pool), never process start-up.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time

N_NOOP = 200_000


def noop(x):
    return x


def tiny(x):
    return x + 1


def sleep_task(seconds):
    time.sleep(seconds)
    return seconds


def balance_durations(seed=0):
    """400 lognormal tasks (sigma 1, mean 5 ms) plus 4 of 100x the mean at seeded positions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mean, sigma = 0.005, 1.0
    d = [float(x) for x in rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, size=400)]
    for pos in sorted(rng.choice(404, size=4, replace=False)):
        d.insert(int(pos), 100 * mean)
    return d  # plain floats: the tasks are sleeps, not numpy


def in_order_bound(d, workers):
    """Makespan of the best schedule that starts tasks in input order: chunks of one item, no
    overhead, each to the first free rank. No scheduler that does not know durations does better
    on this input."""
    import heapq

    free = [0.0] * workers
    for x in d:
        heapq.heappush(free, heapq.heappop(free) + x)
    return max(free)


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def latency_samples(call, n=1000, warm=50):
    for _ in range(warm):
        call()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def experiment(map_fn, name, reps, workers):
    """map_fn(func, items, chunksize=None) -> list."""
    if name == "noop":
        items = list(range(N_NOOP))
        times = timed(lambda: map_fn(noop, items), reps)
        return {"items_per_s": [N_NOOP / t for t in times]}
    if name == "balance":
        # One map per seed: the seed places the four long tasks (seed = repetition index).
        out = {"seed": [], "makespan_s": [], "ideal_s": [], "ratio": [], "in_order_bound": []}
        for seed in range(reps):
            d = balance_durations(seed)
            ideal = max(sum(d) / workers, max(d))
            (t,) = timed(lambda: map_fn(sleep_task, d), 1)
            out["seed"].append(seed)
            out["makespan_s"].append(t)
            out["ideal_s"].append(ideal)
            out["ratio"].append(t / ideal)
            out["in_order_bound"].append(in_order_bound(d, workers) / ideal)
        return out
    if name == "latency":
        items = [1, 2, 3, 4]
        return {"latency_ms": [latency_samples(lambda: map_fn(tiny, items)) * 1e3
                               for _ in range(reps)]}
    raise SystemExit(f"unknown experiment {name}")


def run_mpimap(name, reps):
    import mpimap

    with mpimap.Pool() as pool:
        return experiment(lambda f, items: pool.map(f, items), name, reps, pool.size)


def run_futures(name, reps):
    from mpi4py.futures import MPIPoolExecutor

    with MPIPoolExecutor() as ex:
        workers = ex.num_workers
        if name == "noop-best":
            items = list(range(N_NOOP))
            trial = {}
            for cs in (1000, 5000, 20000, 50000, 100000):
                trial[cs] = N_NOOP / min(timed(lambda: list(ex.map(noop, items, chunksize=cs)),
                                               2))
            best = max(trial, key=trial.get)
            times = timed(lambda: list(ex.map(noop, items, chunksize=best)), reps)
            return {"items_per_s": [N_NOOP / t for t in times], "chunksize": best,
                    "trial": trial}
        return experiment(lambda f, items: list(ex.map(f, items)), name, reps, workers)


def run_schwimmbad(name, reps):
    from schwimmbad import MPIPool

    pool = MPIPool()  # workers block inside and exit when the pool closes
    try:
        return experiment(lambda f, items: pool.map(f, items), name, reps, pool.size)
    finally:
        pool.close()


def run_raw(name, reps):
    """The ceiling: blocking mpi4py send/recv of pickled chunks, dynamic, 8 chunks per worker."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    workers = comm.Get_size() - 1
    if comm.Get_rank() != 0:
        while True:
            chunk = comm.recv(source=0, tag=1)
            if chunk is None:
                return None
            comm.send([noop(x) for x in chunk], dest=0, tag=2)

    def raw_map(func, items):
        size = max(1, len(items) // (8 * workers))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        results = [None] * len(chunks)
        status = MPI.Status()
        busy = {}
        nxt = 0
        for w in range(1, workers + 1):
            if nxt < len(chunks):
                comm.send(chunks[nxt], dest=w, tag=1)
                busy[w] = nxt
                nxt += 1
        while busy:
            res = comm.recv(source=MPI.ANY_SOURCE, tag=2, status=status)
            w = status.Get_source()
            results[busy.pop(w)] = res
            if nxt < len(chunks):
                comm.send(chunks[nxt], dest=w, tag=1)
                busy[w] = nxt
                nxt += 1
        return [x for r in results for x in r]

    try:
        return experiment(raw_map, name, reps, workers)
    finally:
        for w in range(1, workers + 1):
            comm.send(None, dest=w, tag=1)


def main():
    tool, name = sys.argv[1], sys.argv[2]
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    runner = {"mpimap": run_mpimap, "futures": run_futures, "schwimmbad": run_schwimmbad,
              "raw": run_raw}[tool]
    out = runner(name, reps)
    if out is not None:
        out.update(tool=tool, experiment=name)
        print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
