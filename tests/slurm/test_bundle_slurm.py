"""files= on the two-fake-node test Slurm: one copy per node through one stager, cache hits on
every node for the next map and the next job, tasks on both nodes reading the right bytes.

The fake nodes share this machine's disk, so each gets its own cache directory through the
{node} placeholder of MPIMAP_CACHE_DIR (what a site with node-local /tmp has anyway)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from testfiles import bundle_project

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bundle_project.py"


def _job(slurm, project, cache, timeout=150):
    res = slurm.mpimap("sbatch", "--wait", "--wait-timeout", str(timeout - 20), "--time", "5",
                       "--nodes", "2", "--ntasks", "3", "--chdir", str(project),
                       "--output", str(project / "job-%j.out"),
                       "--env", f"MPIMAP_CACHE_DIR={cache}/{{node}}",
                       str(SCRIPT), "slurm", timeout=timeout, cwd=project)
    job_id = res.out.strip().splitlines()[0] if res.out.strip() else None
    text = (project / f"job-{job_id}.out").read_text() if job_id else ""
    assert res.rc == 0, f"{res!r}\n{text}"
    line = [x for x in text.splitlines() if x.startswith("{")][-1]
    return json.loads(line), job_id


def test_one_copy_per_node_then_cache_hits_and_right_files_on_both_nodes(slurm, tmp_path):
    project = bundle_project(tmp_path, nfiles=6, unit=50_000)
    cache = tmp_path / "cache"
    doc, job_id = _job(slurm, project, cache)
    assert doc["driver_node"] == "n1"
    nodes_seen = {r["node"] for r in doc["first"] + doc["second"]}
    assert nodes_seen == {"n1", "n2"}, doc["first"]
    for r in doc["first"] + doc["second"]:
        assert r["sum"] == doc["expected"][r["name"]], r
        assert r["helpers"].startswith(f"{cache}/{r['node']}/bundles/"), r  # its node's copy
        # per-rank working directory under the node's per-job $SLURM_TMPDIR
        assert f"/scratch/{r['node']}/job{job_id}/mpimap-" in r["cwd"], r
    assert doc["scratch_left"] == []
    first, second = doc["log"]
    bid = first["id"]
    total = sum(p.stat().st_size for p in (project / "data").iterdir()) + \
        sum(p.stat().st_size for p in (project / "src").glob("*.py"))
    # n1: rank 0 built and published it there, its stager (rank 1) had a hit; n2: one copy
    # through its one stager (rank 2)
    assert first["nodes"] == {"n1": {"stager": 1, "hit": True, "sent": 0},
                              "n2": {"stager": 2, "hit": False, "sent": total, "attempts": 1}}
    assert second["nodes"] == {"n1": {"stager": 1, "hit": True, "sent": 0, "asked": False},
                               "n2": {"stager": 2, "hit": True, "sent": 0, "asked": False}}
    for node, by in (("n1", 0), ("n2", 2)):
        bundles = [b for b in (cache / node / "bundles").glob("*/*") if b.is_dir()]
        assert [b.name for b in bundles] == [bid], bundles
        man = json.loads((bundles[0] / "manifest.json").read_text())
        assert man["staged_by"].get("rank") == by and man["total_bytes"] == total
    # what the cache commands say on a node (run through srun on n2)
    ls = slurm.run(["srun", "--nodelist", "n2", "--ntasks", "1", "--export",
                    f"ALL,MPIMAP_CACHE_DIR={cache}/{{node}}", sys.executable, "-m", "mpimap.cli",
                    "cache", "ls"], timeout=60)
    assert ls.rc == 0 and bid[:12] in ls.out and "on node n2" in ls.out, ls

    # A new job: every node finds the bundle in its cache; nothing is sent.
    doc2, _job2 = _job(slurm, project, cache)
    assert doc2["log"][0]["id"] == bid
    assert doc2["log"][0]["nodes"] == {"n1": {"stager": 1, "hit": True, "sent": 0},
                                       "n2": {"stager": 2, "hit": True, "sent": 0}}
    assert all(r["sum"] == doc2["expected"][r["name"]] for r in doc2["first"])
