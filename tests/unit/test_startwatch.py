"""The start deadline of `python -m mpimap` (no MPI): a rank that does not join in time is ended
with a message; one that joins leaves no watcher behind."""

from __future__ import annotations

import signal
import sys

import procutil


def _run(code):
    return procutil.run_cmd([sys.executable, "-c", code], timeout=60)


def test_a_rank_stuck_past_the_deadline_is_ended_with_the_reason():
    res = _run("import time\nfrom mpimap import _startwatch\n"
               "_startwatch.arm(1.0, 5)\ntime.sleep(30)\nprint('NOT ENDED')")
    assert res.rc == -signal.SIGKILL, res
    assert "NOT ENDED" not in res.out
    assert "mpimap: rank 5 (" in res.err and "MPIMAP_START_TIMEOUT=1 s" in res.err, res


def test_a_rank_that_joins_in_time_goes_on_and_leaves_no_watcher():
    res = _run("import os, time\nfrom mpimap import _startwatch\n"
               "h = _startwatch.arm(2.0, 0)\n_startwatch.disarm(h)\ntime.sleep(3)\n"
               "print('CHILDREN', os.listdir(f'/proc/{os.getpid()}/task'), "
               "open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split())")
    assert res.rc == 0, res
    assert "CHILDREN" in res.out and res.out.strip().endswith("[]"), res
    assert "did not join" not in res.err


def test_zero_means_no_deadline():
    from mpimap import _startwatch

    assert _startwatch.arm(0, 0) is None
    _startwatch.disarm(None)
