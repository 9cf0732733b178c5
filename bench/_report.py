"""Shared by the bench/run_*.py drivers: read a child's RESULT line, write a RESULTS.md section."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def med(values):
    return statistics.median(values)


def result_of(proc, what: str) -> dict:
    """The JSON a benchmark child printed as ``RESULT {...}``; its output if it printed none."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def write_section(begin: str, end: str, section: str, quick: bool = False) -> None:
    """Put ``section`` (which starts with ``begin`` and ends with ``end``) into RESULTS.md in
    place of the old one, or at the end; with ``quick`` only print it."""
    if quick:
        print(section)
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# mpimap benchmark results\n\n"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def testslurm_conf() -> str:
    """SLURM_CONF of the test Slurm (tests/slurm/testslurm.sh; MPIMAP_TESTSLURM_DIR / _PORT
    from the environment pick which one), as the script itself says."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "tests" / "slurm" / "testslurm.sh"
    out = subprocess.run(["bash", str(script), "env"], capture_output=True, text=True,
                         check=True).stdout
    for word in out.split():
        if word.startswith("SLURM_CONF="):
            return word.split("=", 1)[1]
    raise RuntimeError(f"testslurm.sh env printed no SLURM_CONF: {out!r}")


def mpiexec() -> str:
    """The mpiexec of the MPI library mpi4py loads (as `mpimap run` finds it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mpimap._launch import find_mpiexec

    path = find_mpiexec()
    if path is None:
        sys.exit("no mpiexec: pip install -e .[mpich,bench]")
    return path
