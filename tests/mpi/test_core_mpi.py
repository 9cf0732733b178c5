"""Real mpiexec jobs, each a subprocess with a deadline. At most 3 ranks (2-core machines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import procutil
import pytest

from mpimap._launch import find_mpiexec

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

pytestmark = pytest.mark.mpi


def last_json(res):
    for line in reversed(res.out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output:\n{res!r}")


def test_serial_and_parallel_give_the_same_results(run_mpi):
    serial = run_mpi(1, "basic.py", mode="serial")
    assert serial.rc == 0, serial
    expected = last_json(serial)
    assert expected["main_class_results"] == [0, 10, 20, 30, 40]
    assert expected["main_class_exception"] == "negative: -1"
    assert expected["ranks"] == [0]
    for n in (2, 3):
        res = run_mpi(n, "basic.py")
        assert res.rc == 0, res
        got = last_json(res)
        assert got.pop("ranks") == list(range(1, n)), res
        assert got == {k: v for k, v in expected.items() if k != "ranks"}, res


@pytest.mark.parametrize("code", [0, 3])
def test_exit_code_is_the_scripts(run_mpi, code):
    res = run_mpi(3, "exitcode.py", str(code))
    assert res.rc == code, res
    assert "[1, 2]" in res.out


def test_exception_on_rank0_ends_every_rank(run_mpi):
    res = run_mpi(3, "raise_rank0.py", timeout=60)
    assert res.rc != 0, res
    assert "RuntimeError: the script failed on purpose" in res.err
    assert "Traceback" in res.err


def test_exception_on_rank0_while_a_worker_is_busy_still_ends_promptly(run_mpi):
    res = run_mpi(3, "raise_rank0.py", "busy", timeout=60, env={"MPIMAP_SHUTDOWN_TIMEOUT": "2"})
    assert res.rc != 0, res
    assert "the script failed on purpose" in res.err
    assert "did not stop within MPIMAP_SHUTDOWN_TIMEOUT" in res.err


def test_collective_mode_every_rank_calls_pmap(run_mpi):
    res = run_mpi(3, "collective.py", mode="plain")
    assert res.rc == 0, res
    line = next(x for x in res.out.splitlines() if x.startswith("["))
    rows = {r["rank"]: r for r in json.loads(line)}
    assert sorted(rows) == [0, 1, 2], res
    assert rows[0] == {"rank": 0, "pmap": [x * 5 for x in range(10)], "pool": [2, 3, 4, 5, 6],
                       "imap": [1, 2, 3], "root": True}
    for r in (1, 2):  # documented: ranks other than 0 get None / an empty iterator
        assert rows[r] == {"rank": r, "pmap": None, "pool": None, "imap": [], "root": False}


def test_collective_mode_exception_outside_pmap_ends_the_job(run_mpi):
    res = run_mpi(3, "collective_raise.py", mode="plain", timeout=60)
    assert res.rc != 0, res
    assert "KeyError: 'rank 1 failed outside pmap'" in res.err
    assert "should not get here" not in res.out


@pytest.mark.parametrize("stage, expected", [
    ("pickle_task", r"mpimap._errors.SerializationError: cannot serialise the function "
                    r"`pickle_task`.*global `gen`"),
    ("unpickle_task", r"mpimap._errors.SerializationError: the function `unpickle_task` could "
                      r"not be loaded on rank \d.*lab_instrument_driver"),
    ("run", r"builtins.ZeroDivisionError: task 3 divided by zero"),
    ("pickle_result", r"mpimap._errors.SerializationError: the result of item \d+ \(a generator\) "
                      r"cannot be sent back"),
    ("unpickle_result", r"mpimap._errors.SerializationError: the results of items .* could not "
                        r"be rebuilt on rank 0.*cannot be rebuilt on rank 0"),
])
def test_failure_stage_matrix(run_mpi, stage, expected):
    import re

    res = run_mpi(3, "failure_stage.py", stage)
    assert res.rc == 0, res
    caught = [line for line in res.out.splitlines() if line.startswith("CAUGHT")]
    assert caught and re.search(expected, caught[0]), res
    if stage == "run":
        assert "CAUSE RemoteTraceback" in res.out
    assert "AFTER [5]" in res.out, res


@pytest.mark.parametrize("how", ["exit", "kill", "segv"])
def test_worker_death_under_mpimap_run_is_reported(run_mpi, how):
    res = run_mpi(3, "worker_death.py", how, mode="run", timeout=60)
    assert "LOST rank=" in res.out, res
    line = next(x for x in res.out.splitlines() if x.startswith("LOST"))
    assert "5" in line.split("items=")[1], res  # the item that killed it is named
    assert "SURVIVORS [1, 2, 3]" in res.out, res
    assert float(line.rsplit("after=", 1)[1].rstrip("s")) < 10, res


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_worker_death_under_bare_mpiexec_ends_the_job(run_mpi, how):
    res = run_mpi(3, "worker_death.py", how, timeout=60)
    assert res.rc != 0, res  # hydra kills every rank: the job fails, it does not hang


@pytest.mark.parametrize("launcher", ["mpiexec", "mpimap run"])
def test_a_rank_that_dies_before_joining_ends_the_job_instead_of_a_hang(launcher, tmp_path):
    # One rank exits before it starts MPI. The others wait inside MPI_Init for it, and nobody ends
    # them: hydra with -disable-auto-cleanup (what `mpimap run` uses) and srun
    # --kill-on-bad-exit=0 keep them. The start deadline ends every rank instead.
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec: `pip install -e .[mpich,test]`")
    dies = tmp_path / "python"   # rank 2 exits before it starts MPI; the others run Python
    dies.write_text(f'#!/bin/sh\nif [ "$PMI_RANK" = 2 ]; then exit 3; fi\n'
                    f'exec {sys.executable} "$@"\n')
    dies.chmod(0o755)
    script = str(Path(__file__).resolve().parent.parent / "scripts" / "exitcode.py")
    if launcher == "mpiexec":
        argv = [mpiexec, "-disable-auto-cleanup", "-n", "3", dies, "-m", "mpimap", script, "0"]
    else:
        argv = [sys.executable, "-m", "mpimap.cli", "run", "-n", "3", "--python", dies, script,
                "0"]
    res = procutil.run_cmd(argv, timeout=60, env={"MPIMAP_START_TIMEOUT": "3"})
    assert res.rc != 0, res
    assert "did not join the job within MPIMAP_START_TIMEOUT=3 s" in res.err, res


def test_idle_ranks_do_not_spin(run_mpi):
    res = run_mpi(3, "idle_cpu.py", timeout=60)
    assert res.rc == 0, res
    data = last_json(res)
    # 2 s idle each: a spinning rank would burn ~2 s of CPU.
    assert all(v < 0.3 for v in data["workers_idle"].values()), data
    assert data["rank0_waiting"] < 0.3, data


def test_serving_ranks_cap_blas_threads_unless_the_user_chose(run_mpi):
    res = run_mpi(3, "threads_env.py")
    data = last_json(res)
    assert data["rank0"]["OMP_NUM_THREADS"] is None  # rank 0 keeps the user's settings
    assert all(w["OMP_NUM_THREADS"] == "1" for w in data["workers"]), data
    res = run_mpi(3, "threads_env.py", env={"OMP_NUM_THREADS": "2"})
    data = last_json(res)
    assert all(w["OMP_NUM_THREADS"] == "2" and w["MKL_NUM_THREADS"] is None
               for w in data["workers"]), data


def test_pool_initializer_globals_and_persistent_workers(run_mpi):
    res = run_mpi(3, "pool_init.py")
    assert res.rc == 0, res
    assert last_json(res) == {"first": [3.0, 6.0], "second": [30.0, 60.0], "same_workers": True}


def test_imap_over_a_million_item_generator_stays_lazy(run_mpi):
    res = run_mpi(3, "imap_lazy.py", timeout=120)
    assert res.rc == 0, res
    data = last_json(res)
    assert data["seen"] == 1_000_000 and data["total"] == sum(range(1, 1_000_001))
    assert data["worst_read_ahead"] < 200_000, data


def test_progress_bar_on_rank0(run_mpi):
    res = run_mpi(2, "progress.py")
    assert res.rc == 0 and res.out.strip().endswith("124750"), res
    assert "500/500" in res.err, res


def test_mpimap_run_dry_run_prints_the_launcher_command(run_mpi):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mpimap.cli", "run", "-n", "3", "--dry-run",
                          "exitcode.py", "0"], capture_output=True, text=True,
                         cwd=str(SCRIPTS)).stdout
    assert "-n 3" in out and "-m mpimap" in out and "exitcode.py 0" in out


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_quickstart_example_serial_and_parallel_agree(run_mpi):
    serial = run_mpi(1, str(EXAMPLES / "quickstart.py"), mode="serial", timeout=120)
    parallel = run_mpi(3, str(EXAMPLES / "quickstart.py"), mode="run", timeout=120)
    assert serial.rc == 0 and parallel.rc == 0, (serial, parallel)
    tail = lambda r: r.out.strip().splitlines()[-1].split("; ", 1)[1]  # noqa: E731
    assert tail(serial) == tail(parallel)


@pytest.mark.parametrize("example, module", [("emcee_pool.py", "emcee"),
                                             ("scipy_de.py", "scipy")])
def test_pool_works_as_emcee_pool_and_scipy_workers(run_mpi, example, module):
    pytest.importorskip(module)
    serial = run_mpi(1, str(EXAMPLES / example), mode="serial", timeout=180)
    parallel = run_mpi(3, str(EXAMPLES / example), mode="run", timeout=180)
    assert serial.rc == 0 and parallel.rc == 0, (serial, parallel)
    assert serial.out == parallel.out  # deterministic: same chain / same optimum
