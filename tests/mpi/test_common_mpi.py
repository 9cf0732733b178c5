"""Large common data over real MPI: one read-only copy per node, captured arrays, items/results
without a size limit, and nothing left mapped or in /dev/shm afterwards. At most 3 ranks.

The split path (pieces of MPIMAP_MAX_MESSAGE) is exercised cheaply by lowering that knob; one
test sends 2.5 GiB for real when the machine has the memory.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.mpi

SMALL_PIECES = {"MPIMAP_MAX_MESSAGE": "256K"}


def last_json(res):
    for line in reversed(res.out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in the output:\n{res!r}")


def segment_path(path: str, kind: str) -> bool:
    if kind == "memfd":
        return path.startswith("/memfd:mpimap-") and path.endswith("(deleted)")
    if kind == "file":  # unlinked once every rank of the node has mapped it (maybe not yet)
        return path.startswith(f"/dev/shm/mpimap-{os.getuid()}-")
    return "mpimap" not in path  # a private copy: anonymous memory or the heap


def _name(path: str) -> str:
    return path.removesuffix(" (deleted)")


def check_common(d, kind, parallel=True):
    exp = d["expected"]
    look = d["look"]
    assert [x["rank"] for x in look] == d["ranks"]
    for x in look:
        for name in ("grid", "list0", "small", "fortran", "holder", "dc"):
            arr = x[name]
            assert arr["sum"] == exp[name], (name, x)
            assert arr["writeable"] is False, (name, x)
            assert arr["write"].startswith("ValueError"), (name, x)   # writing raises
        for name in ("grid", "list0", "fortran", "holder", "dc"):    # large: the node's copy
            if parallel:
                assert segment_path(x[name]["path"], kind), (name, kind, x[name])
                if kind in ("memfd", "file"):
                    assert x[name]["perms"] == "r--s", x[name]  # shared, and read-only
        assert "mpimap" not in x["small"]["path"]                     # small: copied per rank
        assert x["fortran"]["shape"] == [600, 700]
        assert x["dc_name"] == "g"
        assert x["dict_write"] == "TypeError"
    if parallel and kind in ("memfd", "file"):
        # every rank of the node maps the same segment
        assert len({_name(x["grid"]["path"]) for x in look}) == 1
    assert d["caller_writeable"] is True  # the caller's own array is untouched


def check_rest(d, kind, parallel=True):
    assert d["items_ok"] is True
    shared = kind in ("memfd", "file") and parallel
    for rank, before, after, rest, path, perms in d["closure"]:
        assert (before, after, rest) == (0.0 if parallel else before, 1000.0 + rank,
                                         d["closure_expected"])
        if shared:
            assert segment_path(path, kind) and perms == "rw-p", path  # private, copy-on-write
    if parallel:
        assert d["caller_captured0"] == 0.0   # a task's write stays in that task's rank
    for _rank, total, path, perms in d["partial"]:
        assert total == d["partial_expected"]
        if shared:
            assert segment_path(path, kind) and perms == "rw-p", path
    pool = d["pool"]
    for (r1, p1, s1, t1, ts1), (r2, p2, s2, t2, ts2) in zip(pool["first"], pool["second"]):
        assert r1 == r2 and s1 == s2 == pool["expected"] and ts1 == ts2 == pool["table"]
        if shared:
            assert _name(p1) == _name(p2) and segment_path(p1, kind)  # sent once per pool
            assert _name(t1) == _name(t2) and segment_path(t1, kind)  # the captured table too
    if shared:
        assert len({_name(p) for _r, p, *_ in pool["first"]}) == 1
        assert d["held_between_pool_maps"] is True
    for _rank, total, path, perms in d["init"]:
        assert total == d["init_expected"]
        if shared:
            assert segment_path(path, kind) and perms == "rw-p", path
    assert d["error"] == "'boom with common'"
    assert d["imap_first"] == [0.0, 1.0]
    for what in ("released_after_map", "released_after_code", "released_after_pool",
                 "released_after_init_pool", "released_after_error", "released_after_cancel"):
        assert d[what] is True, (what, d[what])
    assert d["leftovers"] == []


@pytest.mark.parametrize("kind", ["memfd", "file", "copy", "off"])
def test_common_once_per_node(run_mpi, kind):
    env = dict(SMALL_PIECES, MPIMAP_SHARE="auto" if kind == "memfd" else kind)
    res = run_mpi(3, "common_shared.py", env=env, timeout=180)
    assert res.rc == 0, res
    d = last_json(res)
    assert d["ranks"] == [1, 2], res
    check_common(d, kind)
    check_rest(d, kind)
    stats = [x["stats"] for x in d["look"]]
    if kind in ("memfd", "file"):
        # one node, and rank 0 is its receiver: the workers only map, nothing crosses MPI
        assert all(s["kind"] == kind and s["mapped"] == 1 and s["received"] == 0
                   for s in stats), stats
    elif kind == "copy":
        assert all(s["kind"] == "copy" and s["copies"] == 1 and s["mapped"] == 0
                   for s in stats), stats
    else:
        assert all(s["kind"] == "off" and s["copies"] == s["mapped"] == 0 for s in stats)


def test_common_serial_has_the_same_semantics(run_mpi):
    res = run_mpi(1, "common_shared.py", mode="serial", timeout=120)
    assert res.rc == 0, res
    d = last_json(res)
    assert d["ranks"] == [0]
    check_common(d, "serial", parallel=False)
    check_rest(d, "serial", parallel=False)


def test_common_in_collective_mode(run_mpi):
    res = run_mpi(3, "common_collective.py", mode="plain", env=SMALL_PIECES, timeout=120)
    assert res.rc == 0, res
    rows = json.loads(next(x for x in res.out.splitlines() if x.startswith("[")))
    assert len(rows) == 3, res
    root = next(r for r in rows if r["rank"] == 0)
    assert root["results"] == [[1, 6.0, True], [2, 6.0, True]], root
    assert all(r["results"] is None for r in rows if r["rank"] != 0)
    assert root["leftovers"] == []


def test_no_shared_memory_for_the_node_is_a_clear_error(run_mpi):
    res = run_mpi(3, "common_fail.py", timeout=120)
    assert res.rc == 0, res
    d = last_json(res)
    assert d["error_type"] == "SerializationError", d
    assert "could not make the shared copy" in d["error"], d
    assert "No space left on device" in d["error"] and "Fix:" in d["error"], d
    assert d["after"] == [2.0, 2.0]  # the next map works
    assert d["leftovers"] == []


def test_worker_death_with_shared_common_then_carry_on(run_mpi):
    res = run_mpi(3, "common_death.py", mode="run", env=SMALL_PIECES, timeout=120)
    d = last_json(res)
    assert d["lost"].startswith("WorkerLostError"), res
    assert d["rank0_fds_after_loss"] == [], res   # it stopped waiting for the dead rank's ack
    assert d["survivors"] == [2] and d["after"] == [[2, 3.0]], res
    assert d["leftovers"] == [], res


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


NEED = 8 << 30  # 2.5 GiB twice (rank 0's array and one copy), with room to spare


@pytest.mark.slow
@pytest.mark.skipif(_mem_available() < NEED, reason=f"needs {NEED >> 30} GiB of MemAvailable "
                    f"(has {_mem_available() / 2**30:.1f})")
@pytest.mark.parametrize("env", [
    pytest.param({}, id="shared-pieces"),
    pytest.param({"MPIMAP_SHARE": "off", "MPIMAP_MAX_MESSAGE": "4G"}, id="one-large-count-message"),
])
def test_a_single_array_over_2_gib(run_mpi, env):
    res = run_mpi(2, "common_big.py", env=env, timeout=600)
    assert res.rc == 0, res
    d = last_json(res)
    assert d["common"] == d["expected_common"], d
    assert d["result_ok"] is True, d
    assert d["leftovers"] == []
