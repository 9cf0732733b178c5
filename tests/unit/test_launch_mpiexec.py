"""`mpimap run` outside Slurm, for real: hydra's mpiexec (the `mpich` wheel) and, where Debian's
Open MPI is installed, Open MPI's mpirun; and mismatched launchers caught before any work.

Every launch is a subprocess with a deadline; at most 3 ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procutil import clean_env, run_cmd

from mpimap import _launch

SCRIPTS = Path(__file__).resolve().parent.parent / "launch_scripts"
OPENMPI_LIB = "/usr/lib/x86_64-linux-gnu/libmpi.so.40"
OPENMPI = {"MPI4PY_LIBMPI": "libmpi.so.40", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
OVERSUBSCRIBE = "--launcher-arg=--oversubscribe"   # 3 ranks on a 2-core machine

pytestmark = pytest.mark.mpi

needs_openmpi = pytest.mark.skipif(
    not (shutil.which("ompi_info") and os.path.exists(OPENMPI_LIB)),
    reason="Open MPI is not installed (tests/slurm/testslurm.sh install installs Debian's "
           "openmpi-bin)")


def _library_family():
    return _launch.detect_library(sys.executable).family


needs_mpich = pytest.mark.skipif(_library_family() != "mpich",
                                 reason="mpi4py does not load MPICH here")


def run(argv, env=None, timeout=60, cwd=None):
    base = clean_env(drop=("SLURM_", "MPIMAP_", "OMPI_", "PMI"))
    return tuple(run_cmd(argv, timeout=timeout, env=env, cwd=cwd, base_env=base))


def mpimap_run(*args, env=None, timeout=60, cwd=None):
    return run([sys.executable, "-m", "mpimap.cli", "run", *args], env=env, timeout=timeout,
               cwd=cwd)


def _where(tmp_path, *run_args, env=None, n=3):
    out = tmp_path / "where.json"
    rc, so, se = mpimap_run("-n", str(n), *run_args, str(SCRIPTS / "where.py"), "10", str(out),
                            "x y", env=env)
    assert rc == 0, (so, se)
    doc = json.loads(out.read_text())
    assert [r["square"] for r in doc["results"]] == [x * x for x in range(10)]
    assert doc["argv"] == ["x y"]
    assert doc["nworkers"] == n - 1
    return doc


@needs_mpich
def test_run_with_hydra(tmp_path):
    _where(tmp_path)


@needs_mpich
def test_run_exit_code_is_the_scripts(tmp_path):
    rc, so, se = mpimap_run("-n", "2", str(SCRIPTS / "exitcode.py"), "7")
    assert rc == 7, (so, se)


@needs_mpich
@pytest.mark.parametrize("how,code", [("exit", 3), ("kill", 137)])
def test_rank_death_under_hydra_is_reported_and_survivors_go_on(how, code):
    rc, so, se = mpimap_run("-n", "3", str(SCRIPTS / "survive.py"), how)
    assert "LOST WorkerLostError: worker rank" in so, (so, se)
    assert "SURVIVORS [1, 2, 3]" in so, (so, se)
    assert rc == code, (rc, so, se)   # hydra reports the dead rank's status (launchers/hydra.ini)


@needs_mpich
@pytest.mark.parametrize("sig", ["TERM", "INT"])
def test_hydra_forwards_its_signals_to_every_rank(tmp_path, sig):
    _signal_reaches_every_rank(tmp_path, sig, env=None)


@needs_mpich
@needs_openmpi
def test_an_open_mpi_mpirun_is_refused_before_launch(tmp_path):
    rc, so, se = mpimap_run("-n", "2", "--mpiexec", "/usr/bin/mpirun",
                            str(SCRIPTS / "exitcode.py"), "0")
    assert rc == 2 and "is another launcher" in se and "Open MPI" in se, se


@needs_mpich
@needs_openmpi
def test_open_mpi_mpirun_with_mpich_mpi4py_is_explained_before_any_work(tmp_path):
    out = tmp_path / "where.json"
    rc, so, se = run(["/usr/bin/mpirun", "--oversubscribe", "-n", "3", sys.executable, "-m",
                      "mpimap", str(SCRIPTS / "where.py"), "4", str(out)],
                     env={"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    assert rc != 0
    assert se.count("Open MPI's mpirun started this process") == 1, se
    assert "MPICH's own mpiexec" in se
    assert not out.exists()


@needs_mpich
@needs_openmpi
def test_hydra_with_open_mpi_mpi4py_is_explained_before_any_work(tmp_path):
    out = tmp_path / "where.json"
    mpiexec = _launch.find_mpiexec()
    rc, so, se = run([mpiexec, "-n", "3", sys.executable, "-m", "mpimap",
                      str(SCRIPTS / "where.py"), "4", str(out)],
                     env={"MPI4PY_LIBMPI": "libmpi.so.40"})
    assert rc == 2, (so, se)
    assert se.count("mpi4py loads Open MPI, which needs PMIx") == 1, se
    assert not out.exists()


@needs_openmpi
def test_run_with_open_mpi(tmp_path):
    rc, so, se = mpimap_run("-n", "3", "--dry-run", OVERSUBSCRIBE, str(SCRIPTS / "where.py"),
                            env=OPENMPI)
    assert rc == 0 and "/usr/bin/mpirun --enable-recovery --oversubscribe -n 3" in so, se
    _where(tmp_path, OVERSUBSCRIBE, env=OPENMPI)


@needs_openmpi
def test_open_mpi_run_exits_with_rank0s_status(tmp_path):
    # mpirun --enable-recovery itself would exit 0 here
    rc, so, se = mpimap_run("-n", "2", OVERSUBSCRIBE, str(SCRIPTS / "exitcode.py"), "7",
                            env=OPENMPI, cwd=tmp_path)
    assert rc == 7, (so, se)
    rc, so, se = mpimap_run("-n", "2", OVERSUBSCRIBE, str(SCRIPTS / "raises.py"), env=OPENMPI,
                            cwd=tmp_path)
    assert rc == 1 and "ValueError: boom from item 3" in se, (so, se)
    assert not list(tmp_path.glob(".mpimap-run-*")), "status folder left behind"


@needs_openmpi
@pytest.mark.parametrize("how", ["exit", "kill"])
def test_rank_death_under_open_mpi_is_reported_and_survivors_go_on(how):
    rc, so, se = mpimap_run("-n", "3", OVERSUBSCRIBE, str(SCRIPTS / "survive.py"), how,
                            env=OPENMPI)
    assert "LOST WorkerLostError: worker rank" in so, (so, se)
    assert "SURVIVORS [1, 2, 3]" in so, (so, se)
    assert rc == 0, (rc, so, se)   # rank 0 caught it and finished: its status is the run's


@needs_openmpi
@pytest.mark.parametrize("sig", ["USR1", "USR2"])
def test_open_mpi_forwards_its_signals_to_every_rank(tmp_path, sig):
    _signal_reaches_every_rank(tmp_path, sig, env=OPENMPI, extra=[OVERSUBSCRIBE])


def _signal_reaches_every_rank(tmp_path, sig, env, extra=()):
    """Signal `mpimap run` itself (as Slurm signals the batch shell that exec'd it)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    full = dict(os.environ)
    for var in [v for v in full if v.startswith(("SLURM_", "MPIMAP_", "PMI"))]:
        del full[var]
    full.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "mpimap.cli", "run", "-n", "3", *extra,
                             str(SCRIPTS / "signals.py"), str(marks), "3", sig],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (marks / "ready").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"never ready: {proc.communicate(timeout=5)}")
            time.sleep(0.05)
        proc.send_signal(getattr(signal, "SIG" + sig))
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hang: {proc.communicate()}")
    markers = sorted(p.name.split(".")[1] for p in marks.glob("marker.*"))
    assert sorted(set(markers)) == ["rank0", "rank1", "rank2"], (markers, out, err)
    assert proc.returncode == 0, (proc.returncode, out, err)
