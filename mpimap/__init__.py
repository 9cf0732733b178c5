"""mpimap: a parallel map for scientists' Python scripts, over MPI.

    results = mpimap.pmap(simulate, params, common=grid)

Run the script with ``mpiexec -n 8 python -m mpimap script.py`` (or ``mpimap run -n 8
script.py``); with plain ``python script.py`` the same code runs serially, with the same results.

With ``checkpoint="run.h5"`` results stream to an HDF5 file and a rerun computes only what is
missing; ``mpimap.load("run.h5")`` reads them back.

This module imports neither mpi4py nor h5py: a serial run never starts MPI.
"""

from ._checkpoint import MISSING, Checkpoint, load
from ._errors import (BundleError, CheckpointError, MpimapError, RemoteError, SerializationError,
                      WorkerLostError)
from ._pool import Pool, imap, imap_unordered, pmap
from ._runtime import install_excepthook as _install_excepthook
from ._runtime import is_root
from ._task import TaskInfo, rng, task

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "Checkpoint",
    "CheckpointError",
    "MISSING",
    "MpimapError",
    "Pool",
    "RemoteError",
    "SerializationError",
    "TaskInfo",
    "WorkerLostError",
    "imap",
    "imap_unordered",
    "is_root",
    "load",
    "pmap",
    "rng",
    "task",
]

# Under a launcher, an exception that escapes the script on any rank aborts the whole job
# instead of leaving the other ranks waiting in the next collective call until the walltime.
_install_excepthook()
