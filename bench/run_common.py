"""Large common data, side by side in one run; writes the "common" section of bench/RESULTS.md.

    python bench/run_common.py [--ranks 3] [--reps 5] [--quick] [--no-slurm]

Every tool runs as its own MPI job with the same ranks on the same machine, one after the other
(bench/common_bench.py). Time: the median of REPS repetitions, each with a fresh array. Memory:
one sample per tool after every rank has touched the 1 GiB array (PSS is a steady figure). The
node-without-rank-0 figure runs mpimap under the test Slurm (tests/slurm/testslurm.sh, started
here if it is not up, with MPIMAP_TESTSLURM_DIR / MPIMAP_TESTSLURM_PORT from the environment) in
a heterogeneous step: rank 0 alone on n1, two workers on n2. --quick: 1 repetition of 256 MiB
only, nothing written (a smoke test of the benchmark itself, not a result).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

# bench/ is sys.path[0] when a driver runs
from _report import med, mpiexec, result_of, testslurm_conf, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- common:begin -->", "<!-- common:end -->"
SCRIPT = str(HERE / "common_bench.py")
TESTSLURM = ROOT / "tests" / "slurm" / "testslurm.sh"




def launch(tool, mode, mib, ranks, reps, timeout=1800):
    py = sys.executable
    prefix = {"mpimap": [py, "-m", "mpimap"], "futures": [py, "-m", "mpi4py.futures"],
              "futures-pkl5": [py, "-m", "mpi4py.futures"], "raw": [py], "raw-4k": [py]}[tool]
    env = dict(os.environ)
    if tool == "raw-4k":
        env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # numpy's big arrays on 4 KiB pages, like shmem
    name = "raw" if tool == "raw-4k" else tool
    argv = [mpiexec(), "-n", str(ranks), *prefix, SCRIPT, name, mode, str(mib), str(reps)]
    print("+", tool, " ".join(argv[2:]), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=env)
    return result_of(proc, f"{tool} {mode} {mib}")


# -- the test Slurm, for a node without rank 0 -----------------------------------------------------

def _slurm_env():
    env = dict(os.environ)
    env["SLURM_CONF"] = testslurm_conf()
    for var in [v for v in env if v.startswith("SLURM_") and v != "SLURM_CONF"]:
        del env[var]
    return env


def slurm_memory(mib):
    """(result, how) of mpimap's memory mode with rank 0 on n1 and two workers on n2."""
    if shutil.which("salloc") is None:
        return None, "not measured: Slurm is not installed (tests/slurm/testslurm.sh install)"
    started = False
    if subprocess.run(["bash", str(TESTSLURM), "status"], capture_output=True).returncode != 0:
        proc = subprocess.run(["bash", str(TESTSLURM), "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"not measured: the test Slurm did not start:\n{proc.stderr}"
        started = True
    try:
        argv = ["salloc", "-n1", "-w", "n1", "--time", "10", ":", "-n2", "-w", "n2", "--time",
                "10", "srun", "--mpi=pmi2", "--het-group=0,1", sys.executable, "-m", "mpimap",
                SCRIPT, "mpimap", "memory", str(mib)]
        print("+ test Slurm:", " ".join(argv), flush=True)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=HERE,
                              env=_slurm_env())
        return result_of(proc, "mpimap memory on the test Slurm"), "ok"
    finally:
        if started:
            subprocess.run(["bash", str(TESTSLURM), "stop"], capture_output=True)


# -- report -----------------------------------------------------------------------------------------


def machine():
    sys.path.insert(0, str(ROOT))
    import mpi4py
    import numpy
    from mpi4py import MPI

    lib = MPI.Get_library_version().splitlines()[0].strip()
    with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
        shmem_thp = f.read().split("[")[1].split("]")[0]
    return (f"{platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
            f"Linux {platform.release()} (shmem huge pages: {shmem_thp}), Python "
            f"{platform.python_version()}, numpy {numpy.__version__}, mpi4py {mpi4py.__version__}, "
            f"{lib}")


def node_sums(res, node):
    mem = res["nodes"][node]
    n = res["nbytes"]
    return (sum(m["pss"] for m in mem.values()) / n, sum(m["hwm"] for m in mem.values()) / n,
            len(mem), [round(m["pss"] / 2**20) for m in mem.values()])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-slurm", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    sizes = (256,) if args.quick else (256, 1024)
    n = args.ranks
    tools = ("mpimap", "raw", "raw-4k", "futures", "futures-pkl5")
    load = os.getloadavg()
    t = {}
    for mib in sizes:
        for tool in tools:
            if tool.startswith("futures"):
                # A second executor in one `-m mpi4py.futures` run hangs with use_pkl5=True
                # (mpi4py 4.1.2, seen here): one MPI job per repetition, for both variants.
                runs = [launch(tool, "time", mib, n, 1) for _ in range(reps)]
                t[tool, mib] = dict(runs[0], seconds=[r["seconds"][0] for r in runs])
            else:
                t[tool, mib] = launch(tool, "time", mib, n, reps)
    mem_mib = sizes[-1]
    m = {tool: launch(tool, "memory", mem_mib, n, 1)
         for tool in ("mpimap", "raw", "futures", "futures-pkl5")}
    far, far_how = (None, "skipped (--no-slurm)") if args.no_slurm else slurm_memory(mem_mib)

    sec = {k: med(v["seconds"]) for k, v in t.items()}
    best = {k: min(v["seconds"]) for k, v in t.items()}
    big = sizes[-1]
    names = {
        "mpimap": "mpimap `pmap(..., common=a)`",
        "raw": "raw `np.empty` + `comm.Bcast` (numpy default: huge pages)",
        "raw-4k": "raw, 4 KiB pages (`NUMPY_MADVISE_HUGEPAGE=0`)",
        "futures": "mpi4py.futures `MPIPoolExecutor(initializer=...)`",
        "futures-pkl5": "mpi4py.futures, `use_pkl5=True`",
    }
    lines = [
        BEGIN,
        "## Large common data (issue 4: wire speed, one copy per node)",
        "",
        f"Run {datetime.date.today().isoformat()} with `python bench/run_common.py` on "
        f"{machine()}; load average {load[0]:.1f} at the start"
        f"{' (other work shared the machine)' if load[0] > 1.0 else ''}. "
        f"**{n} ranks on one node** (rank 0 + {n - 1} workers), every tool in its own MPI job, "
        "one after the other.",
        "",
        f"### Time until every rank can read the array (seconds, median of {reps})",
        "",
        "From the call until every rank has read one float of every 4 KiB page; allocation and "
        "first touch included on every side; a fresh float64 array each repetition, made "
        "before the clock starts. mpimap: `pmap(touch, range(workers), common=a)`. raw: every "
        "non-root rank `np.empty` + `comm.Bcast`, then a barrier. mpi4py.futures (under "
        "`-m mpi4py.futures`): executor with `initializer=keep, initargs=(a,)` until "
        "`bootup(wait=True)` returns (every worker has run the initializer, which touches it); "
        "each of its repetitions runs in its own MPI job, because a second executor in one "
        "run hung with `use_pkl5=True` (mpi4py 4.1.2).",
        "",
        "| tool | " + " | ".join(f"{s} MiB" for s in sizes) + f" | tool / mpimap ({big} MiB) |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    for tool in tools:
        row = " | ".join(f"{sec[tool, s]:.3f}" for s in sizes)
        lines.append(f"| {names[tool]} | {row} | {sec[tool, big] / sec['mpimap', big]:.2f}x |")
    lines += [
        "",
        f"Goal: mpimap within 1.2x of raw -> **mpimap / raw = "
        f"{sec['mpimap', big] / sec['raw', big]:.2f}** at {big} MiB "
        f"({sec['mpimap', sizes[0]] / sec['raw', sizes[0]]:.2f} at {sizes[0]} MiB); against raw "
        f"on 4 KiB pages {sec['mpimap', big] / sec['raw-4k', big]:.2f} "
        f"({sec['mpimap', sizes[0]] / sec['raw-4k', sizes[0]]:.2f}). Even against raw's "
        f"fastest repetition ({best['raw', big]:.3f} s at {big} MiB, {best['raw', sizes[0]]:.3f} s "
        f"at {sizes[0]} MiB), mpimap's median is "
        f"**{sec['mpimap', big] / best['raw', big]:.2f}x** "
        f"({sec['mpimap', sizes[0]] / best['raw', sizes[0]]:.2f}x).",
        "",
        "How to read it. The raw reference's cost is page allocation on the receiving ranks; "
        "numpy asks for transparent huge pages for big arrays, and on this VM a fresh huge page "
        "sometimes costs far more than its 512 small pages (cold guest memory): the raw "
        "repetitions swing between under a second and several seconds per GiB (all values in "
        "the raw data below), so its median moves from run to run; hence the comparison with "
        "its fastest repetition as well. mpimap's copy lives in "
        "shared memory, which the kernel here gives 4 KiB pages only (`shmem_enabled` = never), "
        "so the same raw transfer on 4 KiB pages is shown too. mpimap writes one copy per node "
        "(rank 0 `pwrite`s it into a memfd; no MPI transfer on rank 0's node) and the workers "
        "map it with `MAP_POPULATE`; the raw reference writes one copy per receiving rank.",
        "",
        f"### Memory on the node, {mem_mib} MiB array (multiples of the array size)",
        "",
        "Summed PSS (`/proc/<pid>/smaps_rollup`) of the node's ranks, sampled by rank 0 once "
        "every rank has touched the array and still holds it (mpimap: a `Pool(common=a)` "
        "between two maps; raw: between two barriers; futures: after `bootup`, the "
        "initializer's global holds it). PSS splits a shared page between the processes that "
        "map it, so the sum counts it once; peak RSS (VmHWM) counts it once per rank. Both "
        "include the Python interpreters (numpy, mpi4py: a few tens of MiB each).",
        "",
        "| tool | ranks on the node | summed PSS | summed peak RSS | PSS per rank (MiB) |",
        "|---|---:|---:|---:|---|",
    ]
    for tool in ("mpimap", "raw", "futures", "futures-pkl5"):
        res = m[tool]
        pss, hwm, k, per = node_sums(res, res["rank0_node"])
        lines.append(f"| {names[tool]} | {k} (rank 0's node) | {pss:.2f}x | {hwm:.2f}x | {per} |")
    pss0 = node_sums(m["mpimap"], m["mpimap"]["rank0_node"])[0]
    if far is not None:
        other = [node for node in far["nodes"] if node != far["rank0_node"]][0]
        fpss, fhwm, k, per = node_sums(far, other)
        lines.append(f"| mpimap, test Slurm: a node without rank 0 ({other}) | {k} | "
                     f"{fpss:.2f}x | {fhwm:.2f}x | {per} |")
        far_text = (f"on a node without rank 0, at most 1.1x -> **{fpss:.2f}x** ({k} ranks on "
                    f"{other}; rank 0 alone on {far['rank0_node']}, a heterogeneous Slurm step "
                    f"on the test Slurm's two fake nodes, which MPI sees as separate nodes).")
    else:
        far_text = f"on a node without rank 0: {far_how}."
    lines += [
        "",
        f"Goals: {n} ranks on one node, at most 2.2x -> **{pss0:.2f}x** (rank 0's own array, "
        f"one shared copy, the interpreters); {far_text} The peers keep one copy per rank "
        "and pickle it on the way (in-band: a second copy while it is sent and rebuilt), which "
        "their summed peak RSS shows.",
        "",
        "Rerun: `python bench/run_common.py` (needs the `bench` extra for nothing beyond mpi4py; "
        "the node-without-rank-0 row needs the test Slurm: `bash tests/slurm/testslurm.sh "
        "install` once, as root).",
        "",
        "<details><summary>raw measurements</summary>",
        "",
        "```json",
        json.dumps({"time": {f"{k[0]}/{k[1]}": v for k, v in t.items()}, "memory": m,
                    "memory_test_slurm": far}, indent=1, default=float),
        "```",
        "</details>",
        END,
    ]
    write_section(BEGIN, END, "\n".join(lines), args.quick)


if __name__ == "__main__":
    main()
