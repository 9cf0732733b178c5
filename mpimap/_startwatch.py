"""A deadline for joining the job (``python -m mpimap``), so a rank that never arrives is no hang.

MPI_Init and the first collectives wait for every rank of the job. A rank that dies before it
gets there (a node without the environment, an ImportError, a crash in the MPI library) leaves
the others waiting inside MPI_Init, in C, where no Python timer runs; with ``srun
--kill-on-bad-exit=0`` (what `mpimap run` and the sbatch template use, so that a worker lost
mid-run becomes a WorkerLostError instead of the end of the job) and hydra's
``-disable-auto-cleanup`` nobody ends them: the job would sit there until its walltime.

So before MPI starts each rank forks a small watcher that holds one end of a pipe. When the rank
has joined (MPI_Init, the communicators, the lifelines: ``disarm``) it closes its end and the
watcher exits at once. If the rank dies, the pipe closes too. If the deadline
(MPIMAP_START_TIMEOUT seconds) passes first, the watcher prints why on stderr and kills the rank,
so every waiting rank of the job ends within the deadline and the launcher reports the job as
failed. A fork, not a thread: a thread would need the GIL, which the rank holds inside MPI_Init.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys


def arm(timeout: float, rank: int | None):
    """Start the watcher (before MPI starts, while this process has no other threads)."""
    if not timeout or not hasattr(os, "fork"):
        return None
    read_end, write_end = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the watcher: no Python cleanup of the rank's state, only os._exit
        code = 0
        try:
            # Signals meant for the rank (hydra's failure notice USR1, a Ctrl-C) must not end
            # the watcher; TERM and KILL still do.
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            os.close(write_end)
            ready, _, _ = select.select([read_end], [], [], timeout)
            if not ready:
                who = f"rank {rank}" if rank is not None else "a rank"
                os.write(2, (
                    f"mpimap: {who} ({socket.gethostname()}) did not join the job within "
                    f"MPIMAP_START_TIMEOUT={timeout:g} s: another rank probably failed before "
                    f"it started MPI (see its error above), or never started; ending this rank "
                    f"so that the job ends instead of waiting until its time limit. (A very "
                    f"large job that needs longer to start: raise MPIMAP_START_TIMEOUT.)\n"
                ).encode())
                os.kill(parent, signal.SIGKILL)
                code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    os.close(read_end)
    return pid, write_end


def disarm(handle) -> None:
    """The rank has joined: the watcher sees the pipe close and exits; reap it."""
    if handle is None:
        return
    pid, write_end = handle
    os.close(write_end)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    except OSError as exc:  # pragma: no cover - nothing else to do about a watcher
        print(f"mpimap: start watcher: {exc}", file=sys.stderr)
