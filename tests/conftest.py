"""Shared fixtures.

``engine``: an Engine over the in-process transport (worker threads, same bytes path), installed
as the executor of the public functions, so ``mpimap.pmap`` in a test runs on it.

``run_mpi``: launch a real MPI job as a subprocess with a deadline (procutil.run_cmd) -- a hang
fails that one test with its output, never the whole run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import procutil
import pytest

from mpimap import _launch, _runtime
from mpimap._driver import Engine
from mpimap._transport import InProcHub

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"


@pytest.fixture(autouse=True, scope="session")
def _own_bundle_cache(tmp_path_factory):
    """Bundles and per-rank directories of this test session live in its own temporary folder
    (inherited by the MPI jobs it starts), never in the user's /tmp/mpimap-<uid>."""
    base = tmp_path_factory.mktemp("mpimap-dirs")
    saved = {k: os.environ.get(k) for k in ("MPIMAP_CACHE_DIR", "MPIMAP_SCRATCH_DIR")}
    os.environ["MPIMAP_CACHE_DIR"] = str(base / "cache")
    os.environ["MPIMAP_SCRATCH_DIR"] = str(base / "scratch")
    yield base
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def make_engine():
    made = []

    def make(nworkers=2, nodes=None):
        hub = InProcHub(nworkers, nodes=nodes)
        engine = Engine(hub)
        previous = _runtime.use_engine(engine)
        made.append((hub, engine, previous))
        return engine

    yield make
    for hub, engine, previous in reversed(made):
        _runtime.restore(previous)
        engine.shutdown(5)
        hub.close()


@pytest.fixture
def small_fs(tmp_path):
    """A real filesystem of 1 MiB (a tmpfs; needs root), to run out of space for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def engine(make_engine):
    return make_engine(2)


def mpiexec():
    path = _launch.find_mpiexec()
    if path is None:
        pytest.skip("no mpiexec: install the MPI test dependencies with "
                    "`pip install -e .[mpich,test]`")
    return path


def run_cmd(argv, timeout=90, env=None, cwd=None):
    before = procutil.shm_names()
    try:
        return procutil.run_cmd(argv, timeout=timeout, env=env, cwd=cwd or SCRIPTS)
    finally:
        procutil.tidy_mpich_shm(before)


@pytest.fixture
def run_mpi():
    """run_mpi(n, script, *args, mode="module"|"plain"|"run"|"serial", timeout=90, env=None)."""

    def run(n, script, *args, mode="module", timeout=90, env=None):
        script = str(SCRIPTS / script) if not os.path.isabs(script) else script
        py = sys.executable
        if mode == "serial":
            argv = [py, script, *args]
        elif mode == "module":
            argv = [mpiexec(), "-n", n, py, "-m", "mpimap", script, *args]
        elif mode == "plain":
            argv = [mpiexec(), "-n", n, py, script, *args]
        elif mode == "run":
            mpiexec()
            argv = [py, "-m", "mpimap.cli", "run", "-n", n, script, *args]
        else:
            raise ValueError(mode)
        return run_cmd(argv, timeout=timeout, env=env)

    return run
