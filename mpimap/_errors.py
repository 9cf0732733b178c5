"""mpimap's exception tree.

    Exception
     └── MpimapError                 base of mpimap's own errors
          ├── BundleError            a files= entry is missing, unreadable, unsafe, or fails its checksum
          ├── CheckpointError        the checkpoint belongs to another function/input, or is unreadable
          ├── WorkerLostError        a worker rank died (signal, os._exit, OOM); names rank, host, items
          ├── SerializationError     something cannot cross ranks; names the object and the fix
          ├── RemoteError            a task's exception that cannot be rebuilt on rank 0
          └── LaunchError            mpimap run / sbatch cannot start the job; says how to fix it
               └── CommandError      an external command failed: argv, exit code, output

Bad arguments get plain ValueError / TypeError. A task's own exception is re-raised as itself, with a
RemoteTraceback chained as ``__cause__`` (so the worker's traceback prints under the local one, the way
concurrent.futures and mpi4py.futures show it) and a note naming the item, rank and host.
"""

from __future__ import annotations

import shlex
import sys

__all__ = [
    "BundleError",
    "CheckpointError",
    "CommandError",
    "LaunchError",
    "MpimapError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerLostError",
    "attach_remote",
]


class MpimapError(Exception):
    """Base class of every error mpimap raises itself."""


class BundleError(MpimapError):
    """A ``files=`` entry is missing, unreadable, unsafe, or fails its checksum."""


class CheckpointError(MpimapError):
    """The checkpoint file belongs to another function or input, or cannot be read."""


class SerializationError(MpimapError):
    """The function, common data, an item or a result cannot cross between ranks."""


class WorkerLostError(MpimapError):
    """A worker rank died while it held work.

    Attributes: ``rank``, ``host``, ``items`` (sorted item indices it held).
    """

    def __init__(self, message, rank=None, host=None, items=()):
        super().__init__(message)
        self.rank = rank
        self.host = host
        self.items = list(items)

    def __reduce__(self):
        return (type(self), (self.args[0], self.rank, self.host, self.items))


class RemoteError(MpimapError):
    """A task raised an exception that could not be rebuilt on rank 0.

    Attributes: ``type_name`` (e.g. ``"mymod.MyError"``), ``message`` (its ``str()``) and
    ``remote_traceback`` (the worker's formatted traceback).
    """

    def __init__(self, type_name, message, remote_traceback="", reason=""):
        text = f"{type_name}: {message}"
        if reason:
            text += f" (it could not be rebuilt on rank 0: {reason})"
        super().__init__(text)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class LaunchError(MpimapError):
    """A problem starting a job (``mpimap run`` / ``sbatch``) the user can fix; the message says
    how. The command line prints it and exits 2."""


class CommandError(LaunchError):
    """An external command failed: carries its argv, exit code, stdout and stderr."""

    def __init__(self, argv, returncode, stdout="", stderr="", why=None):
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout or ""
        self.stderr = stderr or ""
        head = why or f"command failed with exit code {returncode}"
        parts = [f"{head}: {shlex.join(self.argv)}"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            text = text.strip()
            if text:
                parts.append(f"--- {name} ---\n{text}")
        super().__init__("\n".join(parts))


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; chained as ``__cause__`` of the re-raised error."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


def attach_remote(exc, tb_text, where):
    """Chain the worker traceback to ``exc`` and name the item, rank and host (``where``).

    On Python 3.11+ ``where`` also goes into a note on ``exc`` itself; on 3.10 it heads the
    chained RemoteTraceback, which prints right above the local traceback.
    """
    head = f"mpimap: raised by {where}"
    cause = RemoteTraceback(f'\n"""\n{head}\n{tb_text.rstrip()}\n"""')
    exc.__cause__ = cause
    if sys.version_info >= (3, 11):
        try:
            exc.add_note(head)
        except Exception:  # an exception type that forbids notes keeps only the cause
            pass
    return exc
