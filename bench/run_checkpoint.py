"""Checkpoint benchmarks; writes the "Checkpoints" section of bench/RESULTS.md.

    python bench/run_checkpoint.py [--ranks 3] [--reps 5] [--folder DIR] [--quick]

Each experiment is one MPI job (bench/checkpoint_bench.py) that maps the same tasks on a warm
pool with and without ``checkpoint=``, alternating, REPS times; figures are medians. The
checkpoint files go to --folder (default: bench/, i.e. the disk the repository is on). --quick:
one repetition, 10x fewer tasks, prints the section instead of writing it (a smoke test of the
benchmark, not a result).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# bench/ is sys.path[0] when a driver runs
from _report import med, mpiexec, result_of, write_section

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- checkpoint:begin -->", "<!-- checkpoint:end -->"



def launch(experiment, ranks, reps, folder, env, divisor, timeout=3600):
    argv = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpimap",
            str(HERE / "checkpoint_bench.py"), experiment, str(reps), str(folder), str(divisor)]
    print("+", " ".join(argv[3:]), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=env)
    return result_of(proc, experiment)



def machine():
    sys.path.insert(0, str(HERE.parent))
    import h5py
    import mpi4py
    from mpi4py import MPI

    lib = MPI.Get_library_version().splitlines()[0].strip()
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"mpi4py {mpi4py.__version__}, {lib}, h5py {h5py.version.version} "
            f"(HDF5 {h5py.version.hdf5_version})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--folder", default=str(HERE))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    env = dict(os.environ)
    env.pop("MPIMAP_SERIAL", None)
    results = {}
    for exp in ("small", "big"):
        results[exp] = launch(exp, args.ranks, reps, args.folder, env, 10 if args.quick else 1)
    rows = []
    for exp, label, short in (("small", "10,000 tasks x 1 ms CPU, float results", "1 ms tasks"),
                              ("big", "1,000 tasks x 50 ms CPU, 1 MiB array results",
                               "1 MiB results")):
        r = results[exp]
        pairs = list(zip(r["plain_s"], r["ckpt_s"]))
        plain, ckpt = med(r["plain_s"]), med(r["ckpt_s"])
        ratio = med([c / p for p, c in pairs])
        rank0 = med([c - p for p, c in zip(r["plain_cpu_s"], r["ckpt_cpu_s"])]) / r["items"]
        jobcpu = med([c / p for p, c in zip(r["plain_job_cpu_s"], r["ckpt_job_cpu_s"])])
        written = med(r["ckpt_wchar"]) - med(r["plain_wchar"])
        rows.append(dict(label=label, short=short, plain=plain, ckpt=ckpt, over=100 * (ckpt / plain - 1),
                         ratio=100 * (ratio - 1), rank0_us=rank0 * 1e6,
                         job=100 * (jobcpu - 1), mb=written / 1e6, mbs=written / 1e6 / ckpt,
                         rate=written / 1e6 / max(rank0 * r["items"], 1e-9),
                         file=r["file_bytes"] / 1e6, reread=r["reread_s"],
                         spread=(min(r["plain_s"]), max(r["plain_s"])),
                         load=med(r["loadavg"])))
    n = args.ranks
    lines = [
        BEGIN,
        "## Checkpoints (issue: HDF5 checkpoints that resume)",
        "",
        f"Run {datetime.date.today().isoformat()} with `python bench/run_checkpoint.py` on "
        f"{machine()}. **{n} ranks** (rank 0 drives and writes the checkpoint, {n - 1} compute), "
        f"the checkpoint on the local disk. One MPI job per experiment, a warm Pool; each "
        f"repetition maps the same tasks once without and once with `checkpoint=` (a new file "
        f"each time; the order alternates), {reps} repetitions, medians. The tasks burn CPU "
        f"time (`time.thread_time`); with {n} ranks on {os.cpu_count()} cores rank 0's work "
        f"for the checkpoint takes CPU from the workers, so it counts in full.",
        "",
        "| experiment | makespan without / with checkpoint (s) | overhead: medians / "
        "median of pairs | job CPU overhead (all ranks) | rank 0 CPU per item | MB written "
        "| MB/s written (over the makespan) | MB written per rank-0 CPU second | file (MB) | "
        "rerun when all done (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in rows:
        lines.append(f"| {w['label']} | {w['plain']:.2f} / {w['ckpt']:.2f} | {w['over']:+.1f}% "
                     f"/ {w['ratio']:+.1f}% | **{w['job']:+.1f}%** | {w['rank0_us']:,.0f} us | "
                     f"{w['mb']:,.1f} | {w['mbs']:,.1f} | {w['rate']:,.0f} | {w['file']:,.1f} | "
                     f"{w['reread']:.2f} |")
    lines += [
        "",
        "Goal: at most 5% on both. *Job CPU overhead*: CPU seconds of all ranks with the "
        "checkpoint over those without (median of the pairs); the workers' share is fixed by "
        "the tasks, so on a machine with no other load this is the makespan overhead, and "
        "unlike the makespan it does not move with other processes' load. *Rank 0 CPU per "
        "item*: the extra CPU time of rank 0 (median of the pairs) over the items. "
        "*MB written*: bytes rank 0 handed to write() for the checkpoint (`/proc/self/io` "
        "wchar, with minus without); *MB/s*: that over the checkpointed makespan (set by the "
        "tasks, not by the disk), and over rank 0's extra CPU time (what writing costs). 1 MiB "
        "arrays are written once, as rows of the HDF5 file, which the journal points at; "
        "floats are journaled once a second in one record and stored in batches. *Rerun "
        "when all done*: the same map again on the finished file (read back, nothing "
        "computed).",
        "",
        "Load average during each experiment (median of its samples; the benchmark's own 3 ranks included): "
        + ", ".join(f"{w['load']:.1f} ({w['short']})" for w in rows)
        + " on 2 cores. The same map without checkpoint took "
        + "; ".join(f"{w['spread'][0]:.1f}-{w['spread'][1]:.1f} s ({w['short']})" for w in rows)
        + " across the repetitions. Other load on the machine moves the makespan figures (by "
          "tens of percent in a run beside other jobs), not the CPU figures.",
        "",
        "<details><summary>raw measurements</summary>",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "</details>",
        END,
    ]
    write_section(BEGIN, END, "\n".join(lines), args.quick)


if __name__ == "__main__":
    main()
