"""End to end on the test Slurm (two fake nodes n1, n2): mpimap sbatch / mpimap run for real.

Every job is a subprocess with a deadline (Cluster.run); at most 3 ranks per job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ._slurmtest import OPENMPI_ENV, SCRIPTS, have_openmpi

pytestmark = pytest.mark.slow

needs_openmpi = pytest.mark.skipif(
    not have_openmpi(), reason="Open MPI is not installed (tests/slurm/testslurm.sh install "
                               "installs Debian's openmpi-bin)")


def _load(path: Path) -> dict:
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text())


def sbatch_wait(slurm, tmp_path, *args, timeout=90, env=None):
    res = slurm.mpimap("sbatch", "--wait", "--wait-timeout", str(timeout - 10), "--time", "5",
                       "--output", str(tmp_path / "job-%j.out"), *args,
                       timeout=timeout, env=env, cwd=tmp_path)
    job_id = res.out.strip().splitlines()[0] if res.out.strip() else None
    return res, job_id


# ----------------------------------------------------------------------------------------------

def test_sbatch_two_nodes_gives_right_results_on_both_nodes(slurm, tmp_path):
    out = tmp_path / "where.json"
    res, job_id = sbatch_wait(slurm, tmp_path, "--nodes", "2", "--ntasks", "3",
                              str(SCRIPTS / "where.py"), "24", str(out))
    assert res.rc == 0, res
    assert job_id and job_id.isdigit(), res
    doc = _load(out)
    results = doc["results"]
    assert [r["x"] for r in results] == list(range(24))
    assert [r["square"] for r in results] == [x * x for x in range(24)]
    # the workers (ranks 1, 2) sit on both fake nodes; mpimap.task().node is SLURMD_NODENAME
    nodes = {r["node"] for r in results}
    assert nodes == {"n1", "n2"}, results
    assert all(r["node"] == r["slurmd_nodename"] for r in results)
    assert doc["nworkers"] == 2
    assert doc["driver_node"] == "n1"
    # per-node, per-job scratch from the cluster's TaskProlog, removed again by its Epilog
    scratch = {r["node"]: r["slurm_tmpdir"] for r in results}
    assert all(r["slurm_tmpdir_exists"] for r in results), results
    assert scratch["n1"] != scratch["n2"] and all(f"job{job_id}" in s for s in scratch.values())
    assert not any(os.path.exists(s) for s in scratch.values()), "Epilog left the scratch"
    assert "ended COMPLETED" in res.err, res


def test_run_inside_an_allocation_uses_srun_with_pmi2(slurm, tmp_path):
    out = tmp_path / "where.json"
    dry = slurm.run(["salloc", "--nodes", "2", "--ntasks", "3", "--time", "2", sys.executable,
                     "-m", "mpimap.cli", "run", "--dry-run", str(SCRIPTS / "where.py"), "6",
                     str(out)], timeout=60)
    assert dry.rc == 0, dry
    line = dry.out.strip().splitlines()[-1]
    assert re.search(r"/srun --mpi=pmi2 --kill-on-bad-exit=0 .* -m mpimap .*where\.py 6 ",
                     line), dry
    assert " -n " not in line, dry   # every task of the allocation
    res = slurm.run(["salloc", "--nodes", "2", "--ntasks", "3", "--time", "2", sys.executable,
                     "-m", "mpimap.cli", "run", str(SCRIPTS / "where.py"), "12", str(out)],
                    timeout=90)
    assert res.rc == 0, res
    doc = _load(out)
    assert [r["square"] for r in doc["results"]] == [x * x for x in range(12)]
    assert {r["node"] for r in doc["results"]} == {"n1", "n2"}


@needs_openmpi
def test_run_inside_an_allocation_with_open_mpi_uses_srun_pmix(slurm, tmp_path):
    out = tmp_path / "where.json"
    cmd = ["salloc", "--nodes", "2", "--ntasks", "3", "--time", "2", sys.executable, "-m",
           "mpimap.cli", "run"]
    dry = slurm.run([*cmd, "--dry-run", str(SCRIPTS / "where.py"), "6", str(out)],
                    env=OPENMPI_ENV, timeout=60)
    assert "srun --mpi=pmix " in dry.out, dry
    res = slurm.run([*cmd, str(SCRIPTS / "where.py"), "12", str(out)], env=OPENMPI_ENV,
                    timeout=90)
    assert res.rc == 0, res
    doc = _load(out)
    assert [r["square"] for r in doc["results"]] == [x * x for x in range(12)]
    assert {r["node"] for r in doc["results"]} == {"n1", "n2"}


def test_srun_without_pmi_is_explained_before_any_work(slurm, tmp_path):
    out = tmp_path / "where.json"
    res = slurm.run(["srun", "--mpi=none", "--nodes", "2", "--ntasks", "3", "--time", "2",
                     sys.executable, "-m", "mpimap", str(SCRIPTS / "where.py"), "6", str(out)],
                    timeout=60)
    assert res.rc != 0, res
    assert "srun started 3 processes" in res.err and "--mpi=pmi2" in res.err, res
    assert res.err.count("srun started 3 processes") == 1, res   # said once, not per process
    assert not out.exists()


def test_task_that_raises_fails_the_job_with_the_exception_in_its_output(slurm, tmp_path):
    res, job_id = sbatch_wait(slurm, tmp_path, "--nodes", "2", "--ntasks", "3",
                              str(SCRIPTS / "raises.py"))
    assert res.rc != 0, res
    fields = slurm.job(job_id)
    assert fields["JobState"] == "FAILED", fields
    text = slurm.output(fields)
    assert "ValueError: boom from item 3" in text, text
    assert "NOT REACHED" not in text
    assert "ended FAILED" in res.err, res


def test_exit_code_of_the_script_is_the_job_exit_code(slurm, tmp_path):
    res, job_id = sbatch_wait(slurm, tmp_path, "--ntasks", "2", str(SCRIPTS / "exitcode.py"),
                              "7")
    assert res.rc == 7, res
    assert slurm.job(job_id)["ExitCode"] == "7:0"


def test_hostile_names_paths_and_arguments_survive_submission(slurm, tmp_path):
    weird = tmp_path / "dir with spaces 'q' \"dq\" $HOME 100%"
    weird.mkdir()
    script = weird / "my script $x %j.py"
    script.write_text((SCRIPTS / "where.py").read_text())
    out = weird / "out $HOME %j.json"
    args = ["a b", "it's", 'say "hi"', "$HOME", "%j", "100%", "back\\slash", "two\nlines", "--x"]
    res = slurm.mpimap("sbatch", "--wait", "--wait-timeout", "60", "--time", "5", "--ntasks",
                       "2", "--job-name", "name with 100% $HOME 'q'", str(script), "3",
                       str(out), *args, timeout=80, cwd=weird)
    assert res.rc == 0, res
    doc = _load(out)
    assert doc["argv"] == args
    assert doc["cwd"] == str(weird)
    job_id = res.out.split()[0]
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=slurm.env,
                           capture_output=True, text=True).stdout
    assert "JobName=name with 100% $HOME 'q' UserId=" in shown, shown
    # the default output name holds the job name literally (its % escaped for Slurm)
    produced = weird / f"name with 100% $HOME 'q'-{job_id}.out"
    assert produced.exists(), sorted(p.name for p in weird.iterdir())
    assert "squares ok: True" in produced.read_text()


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_rank_death_under_srun_is_reported_and_survivors_go_on(slurm, tmp_path, how):
    res, job_id = sbatch_wait(slurm, tmp_path, "--nodes", "2", "--ntasks", "3",
                              str(SCRIPTS / "survive.py"), how)
    text = slurm.output(slurm.job(job_id))
    assert "LOST WorkerLostError: worker rank" in text, text
    assert "SURVIVORS [1, 2, 3]" in text, text
    # srun reports the dead task; the step's status is the highest task status
    assert ("Exited with exit code 3" if how == "exit" else "Killed") in text, text
    assert res.rc != 0, res


# ----------------------------------------------------------------------------------------------
# The warning signal reaches every rank through each launcher the template supports.

LAUNCH_CASES = [
    pytest.param("srun", {}, id="srun-mpich"),
    pytest.param("mpiexec", {}, id="hydra-mpiexec"),
    pytest.param("srun", OPENMPI_ENV, id="srun-openmpi", marks=needs_openmpi),
    pytest.param("mpiexec", OPENMPI_ENV, id="openmpi-mpirun", marks=needs_openmpi),
]


def _signal_directive(slurm, tmp_path, launcher, env):
    """The template's warning for this launcher: (signal name, sent to the batch shell?)."""
    dry = slurm.mpimap("sbatch", "--dry-run", "--launcher", launcher, "--signal", "90",
                       "--time", "10", str(SCRIPTS / "signals.py"), env=env, cwd=tmp_path)
    assert dry.rc == 0, dry
    m = re.search(r"^#SBATCH --signal=(B:)?([A-Z0-9]+)@90$", dry.out, re.M)
    assert m, dry.out
    assert re.search(r"^exec .* -m mpimap\.cli run --launcher ", dry.out, re.M), dry.out
    return m.group(2), bool(m.group(1))


def _wait_for(path: Path, timeout: float, slurm, job_id):
    slurm.wait_until(job_id, path.exists, f"{path.name} never appeared", timeout)


@pytest.mark.parametrize("launcher,env", LAUNCH_CASES)
def test_warning_signal_reaches_every_rank(slurm, tmp_path, markdir, launcher, env):
    sig, to_batch_shell = _signal_directive(slurm, tmp_path, launcher, env)
    # mpiexec: hydra forwards TERM/INT (its USR1 is MPICH's failure notice); Open MPI USR1/USR2
    assert (sig, to_batch_shell) == {("srun", False): ("USR1", False),
                                     ("mpiexec", False): ("INT", True),
                                     ("srun", True): ("USR1", False),
                                     ("mpiexec", True): ("USR1", True)}[launcher, bool(env)]
    res = slurm.mpimap("sbatch", "--launcher", launcher, "--signal", "90", "--time", "10",
                       "--nodes", "2", "--ntasks", "3", "--output",
                       str(tmp_path / "job-%j.out"), str(SCRIPTS / "signals.py"), str(markdir),
                       "3", sig, env=env, cwd=tmp_path)
    assert res.rc == 0, res
    job_id = res.out.split()[0]
    _wait_for(markdir / "ready", 60, slurm, job_id)
    # What Slurm does at the time limit minus 90 s, now: with B: only the batch shell (the
    # exec'd launcher) gets it; without, every task of the job's steps.
    slurm.cancel(job_id, f"--signal={sig}", *(["--batch"] if to_batch_shell else []))
    fields = slurm.wait_job(job_id, timeout=90)
    text = slurm.output(fields)
    assert fields["JobState"] == "COMPLETED", f"{fields}\n{text}"
    markers = sorted(p.name for p in markdir.glob("marker.*"))
    ranks = {m.split(".")[1] for m in markers}
    nodes = {m.split(".")[2] for m in markers}
    assert ranks == {"rank0", "rank1", "rank2"}, (markers, text)
    assert nodes == {"n1", "n2"}, (markers, text)
    assert all((markdir / m).read_text() == f"SIG{sig}" for m in markers)


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_scancel_ends_every_rank_and_leaves_no_python(slurm, tmp_path, markdir, launcher):
    token = f"tok{uuid.uuid4().hex[:10]}"
    res = slurm.mpimap("sbatch", "--launcher", launcher, "--time", "10", "--nodes", "2",
                       "--ntasks", "3", "--output", str(tmp_path / "job-%j.out"),
                       str(SCRIPTS / "term.py"), str(markdir), token, cwd=tmp_path)
    assert res.rc == 0, res
    job_id = res.out.split()[0]
    _wait_for(markdir / "ready", 60, slurm, job_id)
    slurm.cancel(job_id)
    fields = slurm.wait_job(job_id, timeout=60)
    assert fields["JobState"] == "CANCELLED", fields
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", token], capture_output=True, text=True).stdout
        if not left.strip():
            break
        time.sleep(0.2)
    assert not left.strip(), f"processes left after scancel: {left}"
    ranks = {p.name.split(".")[1] for p in markdir.glob("term.*")}
    assert ranks == {"rank0", "rank1", "rank2"}, (ranks, slurm.output(fields))
