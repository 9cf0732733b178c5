"""Helpers shared by the Slurm tests (import as `_slurmtest`; conftest.py holds the fixtures)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "launch_scripts"


def have_openmpi() -> bool:
    """Debian's Open MPI (openmpi-bin) with a libmpi that mpi4py can load."""
    return shutil.which("ompi_info") is not None and any(
        Path(p).exists() for p in ("/usr/lib/x86_64-linux-gnu/libmpi.so.40",
                                   f"/usr/lib/{os.uname().machine}-linux-gnu/libmpi.so.40"))


OPENMPI_ENV = {"MPI4PY_LIBMPI": "libmpi.so.40"}
