"""Launcher command lines as pure functions, and the one place that runs them."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

__all__ = ["find_mpiexec", "mpiexec_argv", "run"]


def find_mpiexec(python: str = sys.executable) -> str | None:
    """The mpiexec beside the running Python (the `mpich` wheel installs it there), else PATH."""
    here = os.path.join(os.path.dirname(python), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def mpiexec_flavour(mpiexec: str) -> str:
    """'hydra' (MPICH), 'openmpi' or 'unknown', from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "HYDRA" in out or "hydra" in out:
        return "hydra"
    if "Open MPI" in out or "OpenRTE" in out or "Open RTE" in out:
        return "openmpi"
    return "unknown"


def mpiexec_argv(mpiexec: str, flavour: str, nprocs: int, script: str, args,
                 python: str = sys.executable, launcher_args=()) -> list[str]:
    """The command line for ``mpimap run`` outside Slurm.

    With MPICH's hydra the survivors of a dead rank are kept alive (-disable-auto-cleanup) and
    every rank runs under mpimap's guard, so rank 0 can report which rank died and what it held.
    """
    argv = [mpiexec]
    guard = []
    if flavour == "hydra":
        argv.append("-disable-auto-cleanup")
        guard = ["--guard"]
    argv += list(launcher_args)
    argv += ["-n", str(nprocs), python, "-m", "mpimap", *guard, script, *args]
    return argv


def run(nprocs: int, script: str, args, dry_run: bool = False, launcher_args=()) -> int:
    if nprocs < 1:
        print("mpimap run: -n must be at least 1", file=sys.stderr)
        return 2
    if not os.path.isfile(script):
        print(f"mpimap run: cannot find the script {script!r}", file=sys.stderr)
        return 2
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("mpimap run: no mpiexec found. Install an MPI with `pip install mpimap[mpich]` "
              "(the mpich wheel), or load your cluster's MPI module.", file=sys.stderr)
        return 2
    argv = mpiexec_argv(mpiexec, mpiexec_flavour(mpiexec), nprocs, script, args,
                        launcher_args=launcher_args)
    if dry_run:
        print(shlex.join(argv))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
    return 127  # not reached
