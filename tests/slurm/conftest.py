"""The test Slurm (tests/slurm/testslurm.sh) as a pytest session fixture.

``slurm``: brings the two-node cluster up if it is not up (installing the Debian packages first
when they are missing and this is root with apt-get), and stops it at the end of the session if
this fixture started it and no other test session is still using it. A developer's own cluster
(started by hand with `testslurm.sh start`) is used and left running.

When Slurm cannot be installed or started, the Slurm tests are skipped with the reason -- unless
MPIMAP_REQUIRE_SLURM=1 (CI), where that is a test failure.

Every job runs as a subprocess with a deadline; a job still queued or running at its deadline
is cancelled, so a hang fails one test, never the run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from procutil import Result, run_cmd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SCRIPT = HERE / "testslurm.sh"
STATE = Path(os.environ.get("MPIMAP_TESTSLURM_DIR", "/tmp/mpimap-testslurm"))
USERS = STATE / "users"                   # one file per test session using the cluster
STARTED_BY_PYTEST = STATE / "started-by-pytest"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "salloc", "scontrol", "scancel")


class Cluster:
    """How tests reach the test Slurm."""

    def __init__(self, conf: Path):
        self.conf = conf
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(conf)
        self.env["PYTHONUNBUFFERED"] = "1"
        for var in [v for v in self.env if v.startswith(("SLURM_", "MPIMAP_"))]:
            if var != "SLURM_CONF":
                del self.env[var]
        # The mpich wheel's UCX netmod intermittently fails in MPI_Init across the fake nodes
        # under srun's pmi2 (its long business cards arrive torn: "mpi/pmi2: invalid client
        # request", then "MPIDI_UCX_comm_addr_exchange ... Invalid parameter"; MPICH's own CI
        # sees the same, pmodels/mpich#7417), about one full run in two here. That is MPICH's
        # start-up, not mpimap: the jobs use its OFI netmod, which has no such exchange.
        self.env.setdefault("MPICH_CH4_NETMOD", "ofi")
        # Debian's Open MPI refuses to start as root without these (CI runs as root).
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        self.env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        self.state = STATE

    def run(self, argv, timeout=90, env=None, cwd=None, job_id_from_stdout=False) -> Result:
        """Run a client command with a deadline; on a hang, cancel the job it submitted."""

        def cancel_submitted(out):
            if job_id_from_stdout and out.strip().splitlines():
                self.cancel(out.strip().splitlines()[0])

        return run_cmd(argv, timeout=timeout, env=env, cwd=cwd, base_env=self.env,
                       on_timeout=cancel_submitted)

    def mpimap(self, *args, timeout=90, env=None, cwd=None) -> Result:
        return self.run([sys.executable, "-m", "mpimap.cli", *args], timeout=timeout, env=env,
                        cwd=cwd, job_id_from_stdout=True)

    def cancel(self, job_id, *flags):
        subprocess.run(["scancel", *flags, str(job_id)], env=self.env, capture_output=True,
                       timeout=30)

    def job(self, job_id) -> dict:
        from mpimap._slurm import parse_show_job

        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env,
                              capture_output=True, text=True, timeout=30)
        return parse_show_job(proc.stdout)

    @staticmethod
    def output(fields: dict) -> str:
        """A job's output file (from ``job()``'s fields), or a note that there is none."""
        path = fields.get("StdOut", "")
        return Path(path).read_text() if path and Path(path).exists() else \
            f"<no output at {path}>"

    def wait_until(self, job_id, ready, what: str, timeout=90) -> None:
        """Poll ``ready()`` while the job is queued or running; fail with the job's output (and
        cancel it) if the job ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.job(job_id).get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING"):
                break
            time.sleep(0.1)
        fields = self.job(job_id)
        self.cancel(job_id)
        pytest.fail(f"{what}; job {fields}:\n{self.output(fields)}")

    def wait_job(self, job_id, timeout=60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                          "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            time.sleep(0.2)
        self.cancel(job_id)
        pytest.fail(f"job {job_id} did not end within {timeout} s: {self.job(job_id)}")


@contextmanager
def _locked():
    """The lock testslurm.sh takes for start/stop, held across our own bookkeeping too."""
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _script(command, timeout):
    env = dict(os.environ, MPIMAP_TESTSLURM_LOCKED="1")
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _live_users() -> list[Path]:
    live = []
    for f in USERS.glob("*") if USERS.is_dir() else []:
        try:
            os.kill(int(f.name), 0)
            live.append(f)
        except (ValueError, ProcessLookupError):
            f.unlink(missing_ok=True)
        except PermissionError:
            live.append(f)
    return live


def _unavailable(reason: str):
    if os.environ.get("MPIMAP_REQUIRE_SLURM") == "1":
        pytest.fail(f"MPIMAP_REQUIRE_SLURM=1, but the test Slurm is not available: {reason}",
                    pytrace=False)
    pytest.skip(f"no test Slurm on this machine: {reason}")


@pytest.fixture(scope="session")
def slurm():
    if shutil.which("bash") is None or shutil.which("flock") is None:
        _unavailable("bash and flock are needed to run tests/slurm/testslurm.sh")
    missing = [p for p in NEEDED if shutil.which(p) is None]
    if missing:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            _unavailable(f"Slurm is not installed ({', '.join(missing)} missing) and installing "
                         f"it needs root and apt-get: run `sudo bash {SCRIPT} install`")
        proc = _script("install", timeout=900)
        if proc.returncode != 0:
            _unavailable(f"`bash {SCRIPT} install` failed:\n{proc.stdout}\n{proc.stderr}")
    me = USERS / str(os.getpid())
    try:
        with _locked():
            if _script("status", timeout=60).returncode != 0:
                proc = _script("start", timeout=180)
                if proc.returncode != 0:
                    _unavailable(f"`bash {SCRIPT} start` failed:\n{proc.stdout}\n{proc.stderr}")
                STARTED_BY_PYTEST.touch()
            USERS.mkdir(parents=True, exist_ok=True)
            me.touch()
    except (OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"cannot start it in {STATE}: {type(exc).__name__}: {exc}")
    try:
        yield Cluster(STATE / "cluster" / "etc" / "slurm.conf")
    finally:
        with _locked():
            me.unlink(missing_ok=True)
            if STARTED_BY_PYTEST.exists() and not _live_users():
                _script("stop", timeout=180)
                STARTED_BY_PYTEST.unlink(missing_ok=True)
            try:
                USERS.rmdir()
            except OSError:
                pass


@pytest.fixture
def markdir(tmp_path):
    """A fresh folder for marker files (the fake nodes share this machine's file system)."""
    d = tmp_path / "marks"
    d.mkdir()
    return d
