"""Checkpoints with real mpiexec jobs: stop signals, kill -9 of the whole job, fresh processes.

Every job is a subprocess with a deadline; at most 3 ranks. Tasks leave a marker file per
computation (tests/scripts/ckpt_map.py), so a test can count how often each item was computed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import SCRIPTS, mpiexec
from testfiles import computed

import mpimap

pytestmark = pytest.mark.mpi

MAP = str(SCRIPTS / "ckpt_map.py")


def launch(argv, env=None):
    full = dict(os.environ, PYTHONUNBUFFERED="1")
    full.pop("MPIMAP_SERIAL", None)
    full.update(env or {})
    return subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full, cwd=SCRIPTS,
                            start_new_session=True)


def finish(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"deadline of {timeout} s passed (a hang)\n--- stdout\n{out}\n--- stderr\n"
                    f"{err}")
    return proc.returncode, out, err


def wait_for(marks, count, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(marks)) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"the job ended before {count} items were computed: "
                        f"{finish(proc, 5)}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"fewer than {count} items computed in {timeout} s")


def last_json(out):
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in:\n{out}")


def module(n=3):
    return [mpiexec(), "-n", n, sys.executable, "-m", "mpimap"]


def run_mpimap(n=3):
    mpiexec()
    return [sys.executable, "-m", "mpimap.cli", "run", "-n", n]


@pytest.mark.parametrize("how, sig, code", [
    ("mpiexec", signal.SIGTERM, 143),          # scancel / the time limit
    ("run", signal.SIGTERM, 143),              # through mpimap run's guard processes
    ("run", signal.SIGINT, 130),               # Ctrl-C; also the hydra template's warning
])
def test_a_stop_signal_saves_every_arrived_result_and_a_rerun_resumes(tmp_path, how, sig,
                                                                       code):
    path, marks = tmp_path / "run.h5", tmp_path / "marks"
    marks.mkdir()
    argv = [*(module() if how == "mpiexec" else run_mpimap()), MAP, path, 300, marks, 0.02]
    proc = launch(argv)
    wait_for(marks, 40, proc)
    os.kill(proc.pid, sig)                     # to mpiexec, which passes it to every rank
    t0 = time.monotonic()
    rc, out, err = finish(proc, 60)
    took = time.monotonic() - t0
    assert rc == code, (rc, out, err)
    assert took < 15, f"{took:.1f} s from the signal to the end of the job"
    assert f"{signal.Signals(sig).name} received: " in err and "rerun to resume" in err, err
    assert "WorkerLostError" not in err and "killed by signal" not in err, err  # workers lived
    saved = [i for i, v in enumerate(mpimap.load(path)) if v is not mpimap.MISSING]
    assert len(saved) >= 40
    before = computed(marks)
    assert set(saved) <= set(before)
    rc, out, err = finish(launch(argv), 90)
    assert rc == 0, err
    assert last_json(out) == {"n": 300, "ok": True}
    counts = computed(marks)
    assert all(counts[x] == 1 for x in saved), "a saved item was computed again"
    assert max(counts.values()) <= 2
    assert sorted(os.listdir(tmp_path)) == ["marks", "run.h5"]


def test_a_long_task_still_ends_the_job_within_slurms_grace(tmp_path):
    path, marks = tmp_path / "run.h5", tmp_path / "marks"
    marks.mkdir()
    proc = launch([*run_mpimap(), MAP, path, 4, marks, 120])     # tasks of two minutes
    time.sleep(6)
    os.kill(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    rc, _out, err = finish(proc, 60)
    assert rc != 0 and time.monotonic() - t0 < 25, err   # grace 5 s + shutdown 5 s
    assert "SIGTERM received: 0 of 4 items done" in err, err


def test_kill_9_of_the_whole_job_at_20_random_points(tmp_path):
    """Each trial: a fresh map, a SIGKILL to every process of the job at a random moment (from
    start-up to the final rename), then a rerun, which must complete with every result right and
    no item computed more than twice."""
    rng = random.Random(20240611)
    n = 60
    for trial in range(20):
        kind = "array" if trial % 2 else "float"   # arrays: rows pointed at by the journal
        folder = tmp_path / f"t{trial}"
        marks = folder / "marks"
        marks.mkdir(parents=True)
        argv = [*module(), MAP, folder / "run.h5", n, marks, 0.03, kind]
        proc = launch(argv)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.05, 1.5))             # start-up, or the first chunks
        else:
            wait_for(marks, rng.randint(1, n), proc)        # anywhere up to the very end
            time.sleep(rng.uniform(0, 0.05))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        rc, out, err = finish(launch(argv), 120)
        assert rc == 0, (trial, err)
        assert last_json(out) == {"n": n, "ok": True}, (trial, out, err)
        counts = computed(marks)
        assert sorted(counts) == list(range(n)), trial
        assert max(counts.values()) <= 2, (trial, counts)
        assert sorted(os.listdir(folder)) == ["marks", "run.h5"], trial
        assert "of 60 items done" in mpimap._checkpoint.info(folder / "run.h5")


HASHSEED = """
import json, sys, time
import mpimap

WORDS = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta"}
WEIGHT = {w: i for i, w in enumerate(WORDS)}     # built in hash order: differs per process


def score(item):
    time.sleep(0.05)
    return sum(len(w) for w in item if w in WORDS) + len(item & {"alpha", "beta"})


if __name__ == "__main__":
    items = [frozenset(WORDS - {w}) | {f"x{i}"} for i, w in enumerate(sorted(WORDS) * 5)]
    stop = int(sys.argv[2])
    out = []
    for r in mpimap.imap(score, items, checkpoint=sys.argv[1]):
        out.append(r)
        if len(out) == stop:
            break
    print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["serial", "mpi"])
def test_a_fresh_process_with_another_hash_seed_resumes(tmp_path, how):
    script = tmp_path / "seeded.py"
    script.write_text(HASHSEED)
    path = tmp_path / "run.h5"
    prefix = [sys.executable] if how == "serial" else module(2)
    results = []
    for seed, stop in (("1", 12), ("2", 30), ("3", 30)):
        rc, out, err = finish(launch([*prefix, script, path, stop],
                                     env={"PYTHONHASHSEED": seed}), 90)
        assert rc == 0, err
        assert "CheckpointError" not in err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[1] == results[2] and results[1][:12] == results[0]
    info = mpimap._checkpoint.info(path)
    assert "30 of 30 items done" in info
    # run 1 computed at least its 12 (workers read ahead), run 2 the rest, run 3 nothing
    new = [int(m) for m in re.findall(r": (\d+) new result\(s\)", info)]
    assert len(new) == 2 and new[0] >= 12 and sum(new) == 30, info
