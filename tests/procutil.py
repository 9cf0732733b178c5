"""Run a command as a subprocess with a deadline: a hang fails one test with its output."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest


class Result:
    def __init__(self, argv, rc, out, err):
        self.argv, self.rc, self.out, self.err = argv, rc, out, err

    def __iter__(self):  # rc, out, err = run_cmd(...)
        return iter((self.rc, self.out, self.err))

    def __repr__(self):
        return (f"<{' '.join(map(str, self.argv))}: rc={self.rc}>\n--- stdout ---\n{self.out}"
                f"\n--- stderr ---\n{self.err}")


def clean_env(drop=("MPIMAP_",), base=None) -> dict:
    """A copy of the environment without variables that start with one of ``drop``."""
    env = dict(os.environ if base is None else base)
    for var in [v for v in env if v.startswith(tuple(drop))]:
        del env[var]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cmd(argv, timeout=90, env=None, cwd=None, base_env=None, on_timeout=None) -> Result:
    """Run ``argv`` in its own session; on the deadline kill the whole process group.

    ``base_env``: the environment to start from (default: this one without MPIMAP_* knobs);
    ``env``: overrides; ``on_timeout(out)``: called after the kill (e.g. to scancel a job).
    """
    full = dict(clean_env() if base_env is None else base_env)
    full.update(env or {})
    proc = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        if on_timeout is not None:
            on_timeout(out)
        pytest.fail(f"deadline of {timeout} s passed (a hang):\n"
                    f"{Result(argv, None, out, err)!r}")
    return Result(argv, proc.returncode, out, err)


def _mapped_shm() -> set:
    """Names under /dev/shm that some process still maps."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return names


def tidy_mpich_shm(before: set) -> None:
    """Remove MPICH segments a killed test job left in /dev/shm (MPICH unlinks them only in
    MPI_Finalize; a rank killed by a signal never gets there). Only names that appeared during
    the job and that no live process maps, so a job still running is never touched."""
    try:
        new = {n for n in os.listdir("/dev/shm") if n.startswith("mpich_")} - before
    except OSError:
        return
    for name in new - _mapped_shm():
        try:
            os.unlink(os.path.join("/dev/shm", name))
        except OSError:
            pass


def shm_names() -> set:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()
