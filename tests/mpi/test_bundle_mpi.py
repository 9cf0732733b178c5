"""files= / modules= with real mpiexec jobs (3 ranks, one node): workers that cannot import the
project's modules, outputs coming back, cache hits across runs, changed modules, late outputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import procutil
import pytest
from testfiles import bundle_project

from mpimap._launch import find_mpiexec

pytestmark = pytest.mark.mpi

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def mpiexec():
    path = find_mpiexec()
    if path is None:
        pytest.skip("no mpiexec: `pip install -e .[mpich,test]`")
    return path


def run_cmd(argv, timeout=120, env=None, cwd=None):
    """A subprocess with a deadline (a hang fails this test only), from ``cwd``; MPIMAP_*
    knobs of this environment are kept, MPIMAP_SERIAL excepted."""
    return procutil.run_cmd(argv, timeout=timeout, env=env, cwd=cwd,
                            base_env=procutil.clean_env(drop=("MPIMAP_SERIAL",)))


@pytest.fixture
def project(tmp_path):
    return bundle_project(tmp_path, nfiles=5, unit=1000)


def run(project, mode, n=3, env=None, timeout=120):
    res = run_cmd([mpiexec(), "-n", n, sys.executable, "-m", "mpimap",
                   str(SCRIPTS / "bundle_project.py"), mode], cwd=project, timeout=timeout,
                  env={"MPIMAP_CACHE_DIR": str(project.parent / "cache"), **(env or {})})
    assert res.rc == 0, res
    return json.loads(res.out.strip().splitlines()[-1]), res


def test_files_and_detected_modules_reach_workers_that_cannot_import_them(project):
    doc, res = run(project, "basic")
    cache = str(project.parent / "cache")
    for r in doc["first"] + doc["second"]:
        assert r["sum"] == doc["expected"][r["name"]]
        # the local module came from the bundle, not from the source tree
        assert r["helpers"].startswith(os.path.join(cache, "bundles")), r
        assert r["helpers"].endswith("/modules/helpers.py")
        assert r["cwd"].endswith("/work") and r["rank"] in (1, 2)
    assert {r["rank"] for r in doc["first"]} == {1, 2}
    assert doc["scratch_left"] == []
    assert doc["outs"] == [f"f{i}.bin.sum" for i in range(5)]
    for i in range(5):  # the files tasks wrote came back under rank 0's cwd
        name = f"data/f{i}.bin"
        assert (project / "out" / f"f{i}.bin.sum").read_text() == doc["expected"][name]
    first, second, third = doc["log"]
    # one node: rank 0 published the bundle there, so its stager (rank 1) had a cache hit
    assert first["nodes"] == {doc["first"][0]["node"]: {"stager": 1, "hit": True, "sent": 0}}
    assert all(n["asked"] is False for n in second["nodes"].values())
    assert "'data/missing.bin' is not in this map's bundle. Add it to files=" in doc["fnf"]
    man = json.loads(run_cmd([sys.executable, "-m", "mpimap.cli", "bundle", "inspect",
                              first["id"]], env={"MPIMAP_CACHE_DIR": cache}).out)
    assert man["detected_imports"] == ["helpers", "helpers2"] and man["files"] == ["data"]
    assert {e["path"] for e in man["entries"]} >= {"files/data/f0.bin", "modules/helpers.py",
                                                   "modules/helpers2.py"}


def test_a_node_with_its_own_cache_receives_the_bundle_over_mpi(project, tmp_path):
    # The workers' cache differs from rank 0's: the bundle travels to the node's stager, in
    # many small pieces sent as bulk messages (their buffers are reused once sent).
    small = {"MPIMAP_BUNDLE_PIECE": "1K", "MPIMAP_INLINE_MAX": "256"}
    wrapper = tmp_path / "rank_env.sh"
    wrapper.write_text(f'#!/bin/sh\n[ "$PMI_RANK" = 0 ] || export MPIMAP_CACHE_DIR='
                       f'{tmp_path}/worker-cache\nexec "$@"\n')
    wrapper.chmod(0o755)
    res = run_cmd([mpiexec(), "-n", 3, str(wrapper), sys.executable, "-m", "mpimap",
                   str(SCRIPTS / "bundle_project.py"), "basic"], cwd=project, timeout=120,
                  env={"MPIMAP_CACHE_DIR": str(tmp_path / "cache"), **small})
    assert res.rc == 0, res
    doc = json.loads(res.out.strip().splitlines()[-1])
    (node,) = doc["log"][0]["nodes"].values()
    total = sum((project / "data" / f"f{i}.bin").stat().st_size for i in range(5)) + \
        (project / "src" / "helpers.py").stat().st_size + \
        (project / "src" / "helpers2.py").stat().st_size
    assert node == {"stager": 1, "hit": False, "sent": total, "attempts": 1}
    assert all(r["sum"] == doc["expected"][r["name"]] for r in doc["first"])
    assert all(r["helpers"].startswith(str(tmp_path / "worker-cache")) for r in doc["first"])
    # the next run finds it on that node: asked, nothing sent
    res = run_cmd([mpiexec(), "-n", 3, str(wrapper), sys.executable, "-m", "mpimap",
                   str(SCRIPTS / "bundle_project.py"), "basic"], cwd=project, timeout=120,
                  env={"MPIMAP_CACHE_DIR": str(tmp_path / "cache")})
    assert res.rc == 0, res
    (node,) = json.loads(res.out.strip().splitlines()[-1])["log"][0]["nodes"].values()
    assert node == {"stager": 1, "hit": True, "sent": 0}


def test_changed_local_module_between_maps_is_used_by_the_workers(project):
    doc, _res = run(project, "modules-change")
    assert doc["before"] == ["v1:", "v1:"] and doc["after"] == ["v2:", "v2:"]


def test_modules_ships_what_detection_cannot_see(project):
    doc, _res = run(project, "plugins")
    assert "No module named 'plugin_a'" in doc["without"]
    assert doc["with"] == ["a", "b"]


def test_outputs_of_chunks_running_when_the_map_failed_still_come_back(project, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    doc, _res = run(project, "late", env={"MARKS": str(marks)})
    assert doc["error"] == "item 0 fails while item 1 runs"
    assert (project / "late1.txt").read_text() == "late 1"  # written after the map had failed
