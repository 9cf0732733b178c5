"""Checkpoints end to end on the test Slurm: a job killed by scancel (or warned before its time
limit) is resubmitted and resumes without computing finished items again.

Every job is a subprocess with a deadline (Cluster.run); 3 ranks on two fake nodes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from testfiles import computed

import mpimap

pytestmark = pytest.mark.slow

CKPT_MAP = Path(__file__).resolve().parent.parent / "scripts" / "ckpt_map.py"


def _wait_for_marks(marks, count, slurm, job_id, timeout=90):
    slurm.wait_until(job_id, lambda: len(os.listdir(marks)) >= count,
                     f"fewer than {count} items computed", timeout)


@pytest.mark.parametrize("launcher, how", [
    ("srun", "scancel"),            # SIGTERM to every task, then SIGKILL after KillWait
    ("srun", "warning"),            # the template's --signal: USR1 to every task
    ("mpiexec", "warning"),         # hydra's template: INT to the batch shell, passed on
])
def test_a_stopped_job_resubmitted_resumes_without_recomputing(slurm, tmp_path, markdir,
                                                                launcher, how):
    path = tmp_path / "run.h5"
    job_args = ["--launcher", launcher, "--nodes", "2", "--ntasks", "3", "--time", "10",
                "--output", str(tmp_path / "job-%j.out")]
    if how == "warning":
        job_args += ["--signal", "60"]
    script = [str(CKPT_MAP), str(path), "400", str(markdir), "0.05"]
    res = slurm.mpimap("sbatch", *job_args, *script, cwd=tmp_path)
    assert res.rc == 0, res
    job_id = res.out.split()[0]
    _wait_for_marks(markdir, 60, slurm, job_id)
    if how == "scancel":
        slurm.cancel(job_id)
        sig = "SIGTERM"
    elif launcher == "srun":
        slurm.cancel(job_id, "--signal=USR1")                 # what Slurm does 60 s before
        sig = "SIGUSR1"
    else:
        slurm.cancel(job_id, "--signal=INT", "--batch")
        sig = "SIGINT"
    fields = slurm.wait_job(job_id, timeout=60)
    text = slurm.output(fields)
    assert fields["JobState"] in ("CANCELLED", "FAILED"), f"{fields}\n{text}"
    assert fields["ExitCode"] != "0:0", fields
    m = re.search(rf"mpimap: {sig} received: (\d+) of 400 items done and saved in "
                  rf"{re.escape(str(path))}; rerun to resume", text)
    assert m, text
    saved = [i for i, v in enumerate(mpimap.load(path)) if v is not mpimap.MISSING]
    assert len(saved) == int(m.group(1)) >= 60
    assert "stopped by " + sig in mpimap._checkpoint.info(path)
    # resubmitted: the same job again
    res = slurm.mpimap("sbatch", "--wait", "--wait-timeout", "110", *job_args, *script,
                       cwd=tmp_path, timeout=120)
    job2 = res.out.split()[0]
    text2 = slurm.output(slurm.job(job2))
    assert res.rc == 0, f"{res!r}\n{text2}"
    assert '{"n": 400, "ok": true}' in text2, text2
    counts = computed(markdir)
    assert sorted(counts) == list(range(400))
    assert all(counts[x] == 1 for x in saved), "a saved item was computed again"
    assert max(counts.values()) <= 2
    info = mpimap._checkpoint.info(path)
    assert f"(Slurm job {job_id})" in info and f"(Slurm job {job2})" in info
    assert f": {400 - len(saved)} new result(s); complete" in info, info
