"""Large common data on two (fake) nodes: each node holds its own copy, made by one receiver per
node; every task sees the right, read-only values; nothing is left mapped or in /dev/shm.

MPI tells the nodes apart through Split_type(COMM_TYPE_SHARED), as on a real cluster. Layouts:
a heterogeneous step puts rank 0 alone on n1 and two workers on n2 (the node without rank 0
shares between two ranks), and `mpimap sbatch --nodes 2 --ntasks 3` puts ranks 0, 1 on n1 and
rank 2 on n2. MPIMAP_MAX_MESSAGE is lowered so the array crosses in many pieces.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from ._slurmtest import SCRIPTS

pytestmark = pytest.mark.slow

ENV = {"MPIMAP_MAX_MESSAGE": "256K"}
MIB = 1 << 20
SHARED_BYTES = 3 * MIB + 2 * MIB   # grid + more: one segment, the run's first shared frame


def check(doc, kind, layout):
    by_rank = dict(doc["where"])
    nodes = defaultdict(list)
    for r, node in by_rank.items():
        nodes[node].append(r)
    rank0 = doc["rank0_node"]
    assert rank0 == "n1"
    assert layout == {node: sorted(rs) for node, rs in nodes.items()}, doc["where"]  # workers

    # per-map common data: right values, read-only, one segment per node
    look = doc["common"]
    assert sorted(x["rank"] for x in look) == sorted(by_rank)
    seg_of_node = defaultdict(set)
    for x in look:
        assert x["sum"] == doc["common_expected"], x
        assert x["writeable"] is False and x["write"] == "ValueError", x
        assert x["same_segment"] is True, x          # both arrays in the node's one segment
        if kind == "memfd":
            assert x["path"].startswith("/memfd:mpimap-") and x["perms"] == "r--s", x
        else:
            assert x["path"].startswith("/dev/shm/mpimap-") and x["perms"] == "r--s", x
        seg_of_node[x["node"]].add(x["path"])
    assert all(len(s) == 1 for s in seg_of_node.values()), seg_of_node   # shared in a node
    assert len(set().union(*seg_of_node.values())) == len(seg_of_node)   # own copy per node
    # one receiver per node: on rank 0's node rank 0 makes the copy (no worker receives);
    # on the other node exactly one worker receives it over MPI and the others map it
    for node, ranks in nodes.items():
        stats = {x["rank"]: x["stats"] for x in look if x["node"] == node}
        receivers = [r for r, s in stats.items() if s["received"] > 0]
        if node == rank0:
            assert receivers == [] and all(s["mapped"] == 1 for s in stats.values()), stats
        else:
            assert receivers == [min(ranks)], stats
            assert stats[min(ranks)]["received"] == SHARED_BYTES, stats
            assert stats[min(ranks)]["created"] == 1, stats
            assert all(s["mapped"] == 1 for r, s in stats.items() if r != min(ranks)), stats
    assert all(n == 0 for _r, n in doc["after_common"]), doc["after_common"]

    # a Pool's common data and an array the function captures: the same segments in both
    # maps (sent once), the captured one private copy-on-write
    exp_c, exp_t = doc["pool_expected"]
    for a, b in zip(doc["pool1"], doc["pool2"]):
        rank, node, cpath, cperms, csum, tpath, tperms, tsum, cwrite, twrite = a
        assert a[:8] == b[:8], (a, b)
        assert (csum, tsum) == (exp_c, exp_t), a
        assert cperms == "r--s" and cwrite == "ValueError", a
        assert tperms == "rw-p" and twrite == "ok", a
        assert "mpimap-" in cpath and "mpimap-" in tpath, a
    for col in (2, 5):
        per_node = defaultdict(set)
        for row in doc["pool1"]:
            per_node[row[1]].add(row[col])
        assert all(len(s) == 1 for s in per_node.values()), per_node
        assert len(set().union(*per_node.values())) == len(per_node), per_node
    assert all(n == 0 for _r, n in doc["after_pool"]), doc["after_pool"]
    assert doc["leftovers"] == []


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_node_without_rank0_shares_one_copy_between_its_ranks(slurm, tmp_path, kind):
    out = tmp_path / "nodes.json"
    env = dict(ENV, MPIMAP_SHARE="auto" if kind == "memfd" else kind)
    # A heterogeneous step: component 0 (rank 0) on n1, component 1 (ranks 1, 2) on n2, one
    # MPI world (srun --mpi=pmi2).
    res = slurm.run(["salloc", "-n1", "-w", "n1", "--time", "3", ":", "-n2", "-w", "n2",
                     "--time", "3", "srun", "--mpi=pmi2", "--het-group=0,1", sys.executable,
                     "-m", "mpimap", str(SCRIPTS / "common_nodes.py"), str(out)],
                    env=env, timeout=120)
    assert res.rc == 0, res
    check(json.loads(out.read_text()), kind, {"n2": [1, 2]})


def test_copy_fallback_gives_each_rank_of_a_node_its_own_copy(slurm, tmp_path):
    """Where a node cannot share memory, its receiver still takes the array off the network once
    and hands each local rank a private, read-only copy."""
    out = tmp_path / "nodes.json"
    res = slurm.run(["salloc", "-n1", "-w", "n1", "--time", "3", ":", "-n2", "-w", "n2",
                     "--time", "3", "srun", "--mpi=pmi2", "--het-group=0,1", sys.executable,
                     "-m", "mpimap", str(SCRIPTS / "common_nodes.py"), str(out)],
                    env=dict(ENV, MPIMAP_SHARE="copy"), timeout=120)
    assert res.rc == 0, res
    doc = json.loads(out.read_text())
    look = {x["rank"]: x for x in doc["common"]}
    assert sorted(look) == [1, 2]
    for x in look.values():
        assert x["sum"] == doc["common_expected"] and x["write"] == "ValueError", x
        assert "mpimap" not in x["path"] and x["stats"]["copies"] == 1, x   # private memory
    assert look[1]["stats"]["received"] == SHARED_BYTES    # the receiver, over MPI
    assert look[2]["stats"]["received"] == 0               # from its receiver, on the node
    exp_c, exp_t = doc["pool_expected"]
    assert all(row[4] == exp_c and row[7] == exp_t and row[8] == "ValueError"
               for row in doc["pool1"] + doc["pool2"]), doc["pool1"]
    assert all(n == 0 for _r, n in doc["after_common"] + doc["after_pool"])
    assert doc["leftovers"] == []


def test_sbatch_two_nodes_each_holds_its_own_copy(slurm, tmp_path):
    out = tmp_path / "nodes.json"
    res = slurm.mpimap("sbatch", "--wait", "--wait-timeout", "110", "--time", "5", "--output",
                       str(tmp_path / "job-%j.out"), "--nodes", "2", "--ntasks", "3",
                       str(SCRIPTS / "common_nodes.py"), str(out), env=ENV, cwd=tmp_path,
                       timeout=120)
    assert res.rc == 0, (res, [p.read_text() for p in Path(tmp_path).glob("job-*.out")])
    check(json.loads(out.read_text()), "memfd", {"n1": [1], "n2": [2]})
