"""Core-map benchmarks, side by side in one run; writes the "Core map" section of RESULTS.md.

    python bench/run_core.py [--ranks 3] [--reps 5] [--quick]

Every tool runs as its own MPI job with the same number of ranks (rank 0 drives, the others
compute), on the same machine, one after the other. Each figure is the median of REPS maps on a
warm pool; ratios are mpimap over the peer. --quick runs 1 repetition (a smoke test of the
benchmark itself, not a result).
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
BEGIN, END = "<!-- core:begin -->", "<!-- core:end -->"



def launch(tool, experiment, ranks, reps, timeout=1800):
    py = sys.executable
    script = str(HERE / "core_bench.py")
    prefix = {"mpimap": [py, "-m", "mpimap"], "futures": [py, "-m", "mpi4py.futures"],
              "schwimmbad": [py], "raw": [py]}[tool]
    argv = [mpiexec(), "-n", str(ranks), *prefix, script, tool, experiment, str(reps)]
    print("+", " ".join(argv[2:]), flush=True)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    return result_of(proc, f"{tool} {experiment}")



def machine():
    sys.path.insert(0, str(HERE.parent))
    import mpi4py
    from mpi4py import MPI  # noqa: F401  (only to read the library name)

    lib = MPI.Get_library_version().splitlines()[0].strip()
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"mpi4py {mpi4py.__version__}, {lib}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps
    n = args.ranks
    load_before = os.getloadavg()[0]
    r = {}
    r["noop", "mpimap"] = launch("mpimap", "noop", n, reps)
    r["noop", "raw"] = launch("raw", "noop", n, reps)
    r["noop", "schwimmbad"] = launch("schwimmbad", "noop", n, reps)
    r["noop", "futures-best"] = launch("futures", "noop-best", n, reps)
    r["noop", "futures"] = launch("futures", "noop", n, reps)
    for tool in ("mpimap", "futures", "schwimmbad"):
        r["balance", tool] = launch(tool, "balance", n, reps)
    for tool in ("mpimap", "futures", "schwimmbad", "raw"):
        r["latency", tool] = launch(tool, "latency", n, reps)

    load_after = os.getloadavg()[0]
    tput = {k[1]: med(v["items_per_s"]) for k, v in r.items() if k[0] == "noop"}
    bal = {k[1]: med(v["ratio"]) for k, v in r.items() if k[0] == "balance"}
    bal_m = r["balance", "mpimap"]
    lat = {k[1]: med(v["latency_ms"]) for k, v in r.items() if k[0] == "latency"}
    best_cs = r["noop", "futures-best"]["chunksize"]

    lines = [
        BEGIN,
        "## Core map (issue: pmap / imap / Pool)",
        "",
        f"Run {datetime.date.today().isoformat()} with `python bench/run_core.py` on {machine()}.",
        f"**{n} ranks** (rank 0 drives, {n - 1} compute), every tool in its own MPI job, one "
        f"after the other; each figure is the median of {reps} maps on a warm pool. mpimap runs "
        "with its automatic chunk size (no tuning). Load average of the machine: "
        f"{load_before:.1f} before, {load_after:.1f} after (other work on the machine inflates "
        "every tool's times, the busy-polling ones most).",
        "",
        "### No-op throughput, 200,000 items (items/s, higher is better)",
        "",
        "| tool | items/s | mpimap / tool |",
        "|---|---:|---:|",
    ]
    names = {"mpimap": "mpimap (automatic chunksize)", "raw": "raw mpi4py send/recv of pickled "
             "chunks (ceiling)", "futures-best": f"mpi4py.futures, best chunksize ({best_cs})",
             "futures": "mpi4py.futures, default chunksize (1)", "schwimmbad": "schwimmbad MPIPool"}
    for tool in ("mpimap", "raw", "futures-best", "futures", "schwimmbad"):
        lines.append(f"| {names[tool]} | {tput[tool]:,.0f} | {tput['mpimap'] / tput[tool]:.2f}x |")
    lines += [
        "",
        f"Goal: at least 1.5x mpi4py.futures' best -> **{tput['mpimap'] / tput['futures-best']:.2f}x**.",
        "",
        "### Load balance: 400 lognormal sleep tasks (sigma 1, mean 5 ms) + 4 tasks of 500 ms",
        "",
        f"Makespan divided by max(sum of durations / {n - 1} computing ranks, longest task); "
        f"1.00 is perfect. One map per seed, seeds 0-{reps - 1} (the seed places the four long "
        "tasks); the figure is the median over seeds. *In-order bound*: the best any scheduler "
        "that starts tasks in input order without knowing their durations can do on that input "
        "(one item per chunk, zero overhead) -- when a long task sits near the end, nobody "
        "reaches 1.10.",
        "",
        "| tool | median makespan / ideal |",
        "|---|---:|",
    ]
    for tool, label in (("mpimap", "mpimap (automatic chunksize)"),
                        ("futures", "mpi4py.futures (default chunksize 1)"),
                        ("schwimmbad", "schwimmbad MPIPool")):
        lines.append(f"| {label} | {bal[tool]:.3f} |")
    lines += [
        "",
        "| seed | ideal (s) | in-order bound | mpimap | mpi4py.futures | schwimmbad |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, seed in enumerate(bal_m["seed"]):
        lines.append(f"| {seed} | {bal_m['ideal_s'][i]:.3f} | {bal_m['in_order_bound'][i]:.3f} | "
                     f"{bal_m['ratio'][i]:.3f} | {r['balance', 'futures']['ratio'][i]:.3f} | "
                     f"{r['balance', 'schwimmbad']['ratio'][i]:.3f} |")
    lines += [
        "",
        f"Goal: at most 1.10 -> **{bal['mpimap']:.3f}** (median over seeds; in-order bound "
        f"median {med(bal_m['in_order_bound']):.3f}).",
        "",
        "### Latency of one small map on a warm pool (4 items, ms per call, lower is better)",
        "",
        "| tool | ms per map | tool / mpimap |",
        "|---|---:|---:|",
    ]
    for tool, label in (("mpimap", "mpimap Pool.map"), ("futures", "mpi4py.futures map"),
                        ("schwimmbad", "schwimmbad MPIPool.map"),
                        ("raw", "raw mpi4py (floor)")):
        lines.append(f"| {label} | {lat[tool]:.3f} | {lat[tool] / lat['mpimap']:.2f}x |")
    lines += [
        "",
        f"Goal: at most 0.2 ms -> **{lat['mpimap']:.3f} ms**. schwimmbad and the raw loop "
        "busy-poll inside MPI on every rank all the time (they spin a core even when idle); "
        "mpimap sleeps when idle and polls only while a reply is due within 0.3 ms "
        "(MPIMAP_SPIN).",
        "",
        "<details><summary>raw measurements</summary>",
        "",
        "```json",
        json.dumps({f"{k[0]}/{k[1]}": v for k, v in r.items()}, indent=1, default=float),
        "```",
        "</details>",
        END,
    ]
    section = "\n".join(lines)
    summary = (
        f"Core map, {n} ranks: no-op throughput **{tput['mpimap']:,.0f} items/s** with the "
        f"automatic chunk size = **{tput['mpimap'] / tput['futures-best']:.1f}x** mpi4py.futures at "
        f"its best chunksize and {tput['mpimap'] / tput['futures']:,.0f}x at its default; "
        f"skewed load balance **{bal['mpimap']:.2f}** x ideal (mpi4py.futures "
        f"{bal['futures']:.2f}, schwimmbad {bal['schwimmbad']:.2f}); latency of a small map on "
        f"a warm pool **{lat['mpimap']:.2f} ms** (mpi4py.futures {lat['futures']:.2f} ms).")
    write_section(BEGIN, END, section, args.quick)
    if args.quick:
        print(summary)
    else:
        set_block(HERE.parent / "README.md", "core", summary)
        print("wrote the README summary")


def set_block(path, name, body):
    """Replace the text between <!-- NAME-figures:begin/end --> in ``path``."""
    begin, end = f"<!-- {name}-figures:begin -->", f"<!-- {name}-figures:end -->"
    text = path.read_text()
    if begin not in text:
        return
    head, rest = text.split(begin, 1)
    path.write_text(head + begin + "\n" + body + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
