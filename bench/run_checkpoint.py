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
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- checkpoint:begin -->", "<!-- checkpoint:end -->"


def mpiexec():
    sys.path.insert(0, str(HERE.parent))
    from mpimap._launch import find_mpiexec

    path = find_mpiexec()
    if path is None:
        sys.exit("no mpiexec: pip install -e .[mpich,bench]")
    return path


def launch(experiment, ranks, reps, folder, env, divisor, timeout=3600):
    argv = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpimap",
            str(HERE / "checkpoint_bench.py"), experiment, str(reps), str(folder), str(divisor)]
    print("+", " ".join(argv[3:]), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=HERE,
                          env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{experiment} failed (rc={proc.returncode}):\n{proc.stdout}\n"
                       f"{proc.stderr}")


def med(values):
    return statistics.median(values)


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
    for exp, label in (("small", "10,000 tasks x 1 ms CPU, float results"),
                       ("big", "1,000 tasks x 50 ms CPU, 1 MiB array results")):
        r = results[exp]
        plain, ckpt = med(r["plain_s"]), med(r["ckpt_s"])
        ratios = [c / p for c, p in zip(r["ckpt_s"], r["plain_s"])]
        cpu = (med(r["ckpt_cpu_s"]) - med(r["plain_cpu_s"])) / r["items"] * 1e6
        wall = (ckpt - plain) / r["items"] * 1e6
        written = med(r["ckpt_wchar"]) - med(r["plain_wchar"])
        rows.append((label, plain, ckpt, 100 * (ckpt / plain - 1), 100 * (med(ratios) - 1),
                     wall, cpu, written / 1e6, written / 1e6 / ckpt, r["file_bytes"] / 1e6,
                     r["reread_s"]))
    n = args.ranks
    lines = [
        BEGIN,
        "## Checkpoints (issue: HDF5 checkpoints that resume)",
        "",
        f"Run {datetime.date.today().isoformat()} with `python bench/run_checkpoint.py` on "
        f"{machine()}. **{n} ranks** (rank 0 drives and writes the checkpoint, {n - 1} compute), "
        f"the checkpoint on the local disk. One MPI job per experiment, a warm Pool; each "
        f"repetition maps the same tasks once without and once with `checkpoint=` (a new file "
        f"each time; the order alternates), {reps} repetitions, medians. Tasks burn CPU time "
        f"(`time.thread_time`), so the figures do not depend on the machine being idle -- but "
        f"with {n} ranks on {os.cpu_count()} cores rank 0's work for the checkpoint takes CPU "
        f"from the workers, so it shows up in full in the makespan.",
        "",
        "| experiment | makespan, no checkpoint (s) | with checkpoint (s) | overhead | "
        "overhead (median of per-pair ratios) | us per item (makespan) | "
        "us per item (rank 0 CPU) | MB written | MB/s written | file (MB) | rerun when "
        "all done (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row[0]} | {row[1]:.2f} | {row[2]:.2f} | **{row[3]:+.1f}%** | "
                     f"{row[4]:+.1f}% | {row[5]:.0f} | {row[6]:.0f} | {row[7]:,.0f} | "
                     f"{row[8]:,.0f} | {row[9]:,.1f} | {row[10]:.2f} |")
    lines += [
        "",
        "Goal: at most 5% on both. *MB written*: bytes rank 0 handed to write() for the "
        "checkpoint (journal, run.h5.tmp rows, the final metadata; `/proc/self/io` wchar, with "
        "checkpoint minus without); *MB/s*: that over the checkpointed makespan. 1 MiB arrays are "
        "written once, as rows of the HDF5 file, which the journal points at; floats go to the "
        "journal and, buffered, to the file. *Rerun when all done*: the same map again with the "
        "finished file (read back, nothing computed).",
        "",
        "<details><summary>raw measurements</summary>",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
        "</details>",
        END,
    ]
    section = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else "# mpimap benchmark results\n\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    if args.quick:
        print(section)
    else:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
