"""``python -m mpimap._rankexit STATUS_FILE COMMAND...``: run one rank and record rank 0's exit.

Used by the Open MPI launcher (launchers/openmpi.ini). ``mpirun --enable-recovery`` keeps the
other ranks alive when one dies, but then exits 0 whatever the ranks return, so a failed run
would look successful. This wrapper runs the rank's real command as a child, passes on the
signals it gets (mpirun forwards USR1/USR2 and sends TERM to end the job), and, on rank 0, writes
the child's exit status (128+N for a death by signal N) to STATUS_FILE; ``mpimap run`` exits
with it. It exits with the same status itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

_FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP,
            signal.SIGQUIT, signal.SIGCONT)
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def _rank(environ) -> str | None:
    for var in _RANK_VARS:
        if environ.get(var, "").isdigit():
            return environ[var]
    return None


def forward_signals(child) -> dict:
    """Pass the signals a launcher sends (_FORWARD) on to ``child``; returns the handlers they
    replaced (to restore them)."""
    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    return {sig: signal.signal(sig, forward) for sig in _FORWARD}


def _die_with_parent():
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2:
        print("usage: python -m mpimap._rankexit STATUS_FILE COMMAND [ARGS...] "
              "(started by `mpimap run` under Open MPI)", file=sys.stderr)
        return 2
    status_file, command = argv[0], argv[1:]
    try:
        child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    except OSError as exc:
        print(f"mpimap: cannot start {command[0]!r}: {exc}", file=sys.stderr)
        code = 127
    else:
        forward_signals(child)
        code = child.wait()
        if code < 0:
            code = 128 - code
    if _rank(os.environ) == "0":
        try:
            _write_atomically(status_file, f"{code}\n")
        except OSError as exc:
            print(f"mpimap: cannot record rank 0's exit status in {status_file}: {exc}",
                  file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
