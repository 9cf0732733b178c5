"""Checkpoints, the light part: ``checkpoint=`` arguments, ``mpimap.MISSING``, stop signals.

Standard library only: ``import mpimap`` imports this module, ``python -m mpimap`` uses it before
MPI starts, and a worker uses it when a checkpointed map arrives -- none of them should pay for
numpy or h5py. The files themselves (journal, HDF5 layout, resume) are ``_checkpoint_io``,
imported on first use.

    pmap(..., checkpoint="run.h5") ─▶ spec(): a Checkpoint, checked before any work
         ─▶ executor ─▶ open_map() ─▶ _checkpoint_io.MapCheckpoint (rank 0 only)

Stop signals. A stop signal (SIGTERM: scancel and the time limit; SIGINT: Ctrl-C; SIGUSR1: the
sbatch templates' warning) during a checkpointed map only sets a flag here. Rank 0 then stops
handing out work, cancels queued chunks, waits up to MPIMAP_CHECKPOINT_GRACE s (default 5) for
chunks already running, writes what arrived, says "N of M done; rerun to resume" and raises
SystemExit(128 + signal) -- KeyboardInterrupt for SIGINT -- so the job ends non-zero within a few
seconds, well inside Slurm's 30 s between SIGTERM and SIGKILL. A second Ctrl-C while a serial task
runs interrupts it at once. The flag is consumed by that exception: a Jupyter kernel interrupted
once can map again.

A worker ignores TERM/INT/USR1 while it holds a checkpointed map: it finishes its task, and rank 0
ends the run (SHUTDOWN, or MPI_Abort after MPIMAP_SHUTDOWN_TIMEOUT if a task runs on).

Only handlers still at their defaults are replaced, and only while a checkpointed map runs: a
script's own handler wins. SIGUSR1 is special. MPICH installs a C handler for it during MPI_Init
(its failure notice; Python cannot see it): set afterwards, a Python handler would replace it, and
restoring "the previous handler" would restore Python's idea of it, SIG_DFL. Installed *before*
MPI_Init, ours still runs (measured with the mpich wheel: MPICH passes the signal on). So under
``python -m mpimap`` rank 0 installs it early (``install_early``); outside a checkpointed map it
ignores the signal, as MPICH's handler did. Under
hydra's mpiexec USR1 *is* that failure notice, sent when a rank dies, so it is left alone there
(the hydra template warns with SIGINT); a worker never touches a USR1 that MPI catches.
"""

from __future__ import annotations

import os
import signal
import threading

from ._env import announced_rank

__all__ = ["MISSING", "Checkpoint", "info", "install_early", "load", "open_map", "spec",
           "worker_signals"]


class _Missing:
    """Stands in ``mpimap.load()``'s list for items that have no result yet."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "mpimap.MISSING"

    def __bool__(self):
        return False

    def __reduce__(self):
        return (_Missing, ())


MISSING = _Missing()


class Checkpoint:
    """Where a map's results go, and what a rerun may do with them.

    ``checkpoint="run.h5"`` is ``Checkpoint("run.h5")``. Options:

    * ``mismatch="raise"`` (default): a rerun whose function, common data, seed or inputs differ
      from the ones the file was made with raises CheckpointError, saying what differs.
      ``mismatch="resume"``: keep the finished results anyway and compute only what is missing
      (items whose input changed are recomputed; the file then records the new identity).
    * ``retry_failed=True`` (default): items that raised (recorded with ``errors="return"``) are
      computed again by a rerun. ``False``: their recorded exceptions are final (returned in
      their place, or raised with ``errors="raise"``).
    """

    def __init__(self, path, mismatch="raise", retry_failed=True):
        if isinstance(path, Checkpoint):
            path = path.path
        try:
            path = os.fspath(path)
        except TypeError:
            raise TypeError(f"checkpoint must be a path (str or os.PathLike) or "
                            f"mpimap.Checkpoint; got {type(path).__name__}") from None
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not path:
            raise ValueError("checkpoint path is empty")
        if mismatch not in ("raise", "resume"):
            raise ValueError(f'mismatch must be "raise" or "resume", not {mismatch!r}')
        if not isinstance(retry_failed, bool):
            raise TypeError(f"retry_failed must be True or False, not {retry_failed!r}")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.mismatch = mismatch
        self.retry_failed = retry_failed
        self.extra: dict = {}  # Pool.map: identity of the pool's common data and initializer

    def __repr__(self):
        return (f"mpimap.Checkpoint({self.path!r}, mismatch={self.mismatch!r}, "
                f"retry_failed={self.retry_failed!r})")

    def __fspath__(self):
        return self.path


def spec(checkpoint, pool_common=None, pool_has_common=False, initializer=None,
         initargs=()) -> Checkpoint | None:
    """Check a ``checkpoint=`` argument before any work starts; returns a Checkpoint or None."""
    if checkpoint is None:
        return None
    ck = Checkpoint(checkpoint.path, checkpoint.mismatch, checkpoint.retry_failed) \
        if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    folder = os.path.dirname(ck.path)
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint {ck.path!r}: the folder {folder!r} does not exist; "
                         f"create it first")
    if os.path.isdir(ck.path):
        raise ValueError(f"checkpoint {ck.path!r} is a folder; give a file name such as "
                         f"{os.path.join(ck.path, 'run.h5')!r}")
    if pool_has_common or initializer is not None:
        ck.extra = {"pool_common": (pool_common, pool_has_common),
                    "initializer": (initializer, tuple(initargs))}
    return ck


def _side(path, what):
    return f"{path}.{what}"


# ----------------------------------------------------------------------------------------------
# Entry points into _checkpoint_io (numpy, h5py)

def load(path, *, missing=MISSING) -> list:
    """The results stored in checkpoint ``path`` (a ``checkpoint=`` file), in input order.

    Items without a result are ``missing`` (default ``mpimap.MISSING``); items that raised
    (recorded with ``errors="return"``) are their exception. Results of a run that was killed
    (still in ``run.h5.journal``) are included. Reading changes no file.
    """
    from . import _checkpoint_io

    return _checkpoint_io.load(path, missing=missing)


def info(path) -> str:
    """The report ``mpimap checkpoint info PATH`` prints."""
    from . import _checkpoint_io

    return _checkpoint_io.info(path)


def open_map(ck, func, source, **kw):
    """Rank 0 / serial: the checkpoint session of one map (see _checkpoint_io.open_map)."""
    from . import _checkpoint_io

    return _checkpoint_io.open_map(ck, func, source, **kw)


# ----------------------------------------------------------------------------------------------
# Stop signals

class _StopState:
    def __init__(self):
        self.active = 0        # checkpointed maps running on this rank 0 / serial process
        self.signum = None     # the first stop signal received
        self.in_task = False   # serial mode: the user's function is running
        self.saved: dict = {}
        self.worker_depth = 0
        self.worker_saved: dict = {}


_STOP = _StopState()
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1")
                      if hasattr(signal, n))


def _hydra() -> bool:
    return "HYDI_CONTROL_FD" in os.environ


def _caught_below_python(sig) -> bool:
    """Does a C-level handler (the MPI library's) catch ``sig``? Python cannot see those."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except OSError:
        pass
    return True  # cannot tell: leave it alone


def _on_signal(signum, _frame):
    if not _STOP.active:
        return  # SIGUSR1 installed early, outside a checkpointed map: ignored
    if _STOP.signum is None:
        _STOP.signum = signum
    elif signum == signal.SIGINT and _STOP.in_task:
        raise KeyboardInterrupt  # a second Ctrl-C while the task runs (serial mode)


def install_early() -> None:
    """``python -m mpimap`` before MPI starts: rank 0 takes SIGUSR1 (the sbatch templates'
    warning under srun and Open MPI) while MPICH's own handler, installed later, still runs
    first and chains to ours. Under hydra USR1 is MPICH's failure notice: left alone."""
    if _hydra() or not hasattr(signal, "SIGUSR1"):
        return
    if announced_rank(os.environ) not in (0, None):
        return
    if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
        signal.signal(signal.SIGUSR1, _on_signal)
        # SA_RESTART (Python's default leaves it off): a USR1 that lands inside MPI_Init or
        # another MPI call must not make the library's system calls fail with EINTR.
        signal.siginterrupt(signal.SIGUSR1, False)


def _default_of(sig):
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL


class _Catcher:
    """Stop signals only set a flag while a checkpointed map runs on rank 0 (or serially)."""

    def __init__(self):
        self.on = False

    def __enter__(self):
        from . import _task

        if threading.current_thread() is not threading.main_thread() or _task.in_task():
            return self
        self.on = True
        _STOP.active += 1
        if _STOP.active == 1:
            for sig in _STOP_SIGNALS:
                current = signal.getsignal(sig)
                if current is _on_signal or current is not _default_of(sig):
                    continue  # ours already, or the script's own handler, which decides
                if sig == getattr(signal, "SIGUSR1", None) and (
                        _hydra() or _caught_below_python(sig)):
                    continue
                _STOP.saved[sig] = current
                signal.signal(sig, _on_signal)
        return self

    def __exit__(self, *exc):
        if not self.on:
            return False
        self.on = False
        _STOP.active -= 1
        if _STOP.active == 0:
            for sig, previous in _STOP.saved.items():
                if signal.getsignal(sig) is _on_signal:
                    signal.signal(sig, previous)
            _STOP.saved.clear()
        return False


def worker_signals(holding: bool) -> None:
    """A worker holding a checkpointed map ignores stop signals: rank 0 ends the run."""
    if threading.current_thread() is not threading.main_thread():
        return
    if holding:
        _STOP.worker_depth += 1
        if _STOP.worker_depth > 1:
            return
        for sig in _STOP_SIGNALS:
            current = signal.getsignal(sig)
            if current is not _default_of(sig):
                continue
            if sig == getattr(signal, "SIGUSR1", None) and _caught_below_python(sig):
                continue  # MPICH's handler: it does not end the process
            _STOP.worker_saved[sig] = current
            signal.signal(sig, signal.SIG_IGN)
    else:
        if _STOP.worker_depth == 0:
            return
        _STOP.worker_depth -= 1
        if _STOP.worker_depth == 0:
            for sig, previous in _STOP.worker_saved.items():
                if signal.getsignal(sig) is signal.SIG_IGN:
                    signal.signal(sig, previous)
            _STOP.worker_saved.clear()


def _stop_exception(signum):
    if signum == signal.SIGINT:
        return KeyboardInterrupt()
    return SystemExit(128 + int(signum))
