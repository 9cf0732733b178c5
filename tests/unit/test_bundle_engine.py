"""files= / modules= through the engine and the worker loop, over the in-process transport (real
frames, worker threads; node names set per worker so each node has its own cache and stager)."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import mpimap
from mpimap import _bundle, _cache
from mpimap._errors import BundleError


@pytest.fixture
def project(tmp_path, monkeypatch):
    p = tmp_path / "proj"
    (p / "data" / "sub").mkdir(parents=True)
    for i in range(6):
        (p / "data" / f"f{i}.txt").write_text(f"content {i}\n")
    (p / "data" / "sub" / "deep.txt").write_text("deep\n")
    (p / "table.csv").write_text("a,b\n1,2\n")
    monkeypatch.chdir(p)
    monkeypatch.setenv("MPIMAP_CACHE_DIR", str(tmp_path / "cache" / "{node}"))
    monkeypatch.setenv("MPIMAP_SCRATCH_DIR", str(tmp_path / "scratch" / "{node}"))
    return p


@pytest.fixture
def two_nodes(make_engine):
    """Ranks 1, 2 on node a; rank 3 on node b; rank 0 (this thread) on this host."""
    return make_engine(3, nodes=["a", "a", "b"])


def read(name):
    with open(name) as fh:
        return fh.read(), mpimap.task().rank


def on_a_worker():
    """True in a worker thread of the in-process transport (not rank 0's own copy)."""
    return threading.current_thread().name.startswith("mpimap-inproc")


def until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_each_node_gets_one_copy_through_one_stager_then_cache_hits(project, two_nodes, tmp_path):
    names = [f"data/f{i}.txt" for i in range(6)] + ["data/sub/deep.txt", "table.csv"]
    out = mpimap.pmap(read, names, files=["data", "table.csv"], chunksize=1)
    assert [text for text, _r in out] == [open(n).read() for n in names]
    (first,) = two_nodes.bundles.log
    total = _bundle.load_manifest(two_nodes.bundles.builder.verified[first["id"]])["total_bytes"]
    assert first["nodes"] == {
        "a": {"stager": 1, "hit": False, "sent": total, "attempts": 1},
        "b": {"stager": 3, "hit": False, "sent": total, "attempts": 1}}
    for node in ("a", "b"):
        path = _cache.bundle_dir(str(tmp_path / "cache" / node), first["id"])
        assert _bundle.verify_published(path, first["id"]) is None
        assert _bundle.load_manifest(path)["staged_by"]["rank"] in (1, 3)
    # the same file set again: neither asked nor sent
    mpimap.pmap(read, names[:2], files=["data", "table.csv"])
    assert all(n["sent"] == 0 and n["hit"] and n.get("asked") is False
               for n in two_nodes.bundles.log[-1]["nodes"].values())


def test_a_node_whose_cache_already_has_the_bundle_receives_nothing(project, make_engine,
                                                                    tmp_path):
    eng = make_engine(3, nodes=["a", "a", "b"])
    mpimap.pmap(read, ["table.csv"], files=["table.csv"])
    eng.shutdown(5)  # its worker threads end, as a run's processes would
    eng.hub.close()
    eng2 = make_engine(3, nodes=["a", "b", "c"])  # a new run: a and b have it, c does not
    mpimap.pmap(read, ["table.csv"], files=["table.csv"])
    nodes = eng2.bundles.log[-1]["nodes"]
    assert nodes["a"]["hit"] and nodes["b"]["hit"] and nodes["a"]["sent"] == 0
    assert not nodes["c"]["hit"] and nodes["c"]["sent"] == 8
    assert eng.bundles.log[-1]["id"] == eng2.bundles.log[-1]["id"]


def test_tasks_run_in_a_working_directory_and_their_files_come_back(project, two_nodes):
    def work(i):
        os.makedirs("results", exist_ok=True)
        with open(f"results/r{i}.txt", "w") as fh:
            fh.write(f"{i} {open('table.csv').read()!r}")
        with open(f"top{i}.bin", "wb") as fh:
            fh.write(os.urandom(100_000) if i == 3 else b"x" * i)
        return os.getcwd()

    cwds = mpimap.pmap(work, range(8), files=["table.csv"], chunksize=2)
    assert all("/work" in c and c != str(project) for c in cwds)
    for i in range(8):
        assert (project / "results" / f"r{i}.txt").read_text() == f"{i} 'a,b\\n1,2\\n'"
        assert (project / f"top{i}.bin").stat().st_size == (100_000 if i == 3 else i)
    assert os.getcwd() == str(project)  # rank 0's cwd never moved


def test_two_items_creating_one_file_is_an_error_naming_both(project, two_nodes):
    def clash(i):
        with open("same.txt", "w") as fh:
            fh.write(f"from {i}")
        return i

    with pytest.raises(BundleError, match=r"items (0 and 1|1 and 0) both created 'same.txt'") \
            as info:
        mpimap.pmap(clash, range(2), files=["table.csv"], chunksize=1)
    first = (project / "same.txt").read_text()
    other = [p for p in project.iterdir() if p.name.startswith("same.txt.mpimap-item")]
    assert len(other) == 1 and {first, other[0].read_text()} == {"from 0", "from 1"}
    assert str(other[0]) in str(info.value)  # says where the second copy is


def test_missing_relative_file_says_add_it_to_files(project, two_nodes):
    def opener(name):
        return open(name).read()

    with pytest.raises(FileNotFoundError, match="'data/f9.txt' is not in this map's bundle. "
                                                "Add it to files="):
        mpimap.pmap(opener, ["data/f9.txt"], files=["data"])
    # a map without files=: the hint says files= ships inputs
    with pytest.raises(FileNotFoundError, match=r"pass it with files=\['nope.txt'\]"):
        mpimap.pmap(opener, ["nope.txt"])
    # a task that expects the error still gets a FileNotFoundError it can catch
    assert mpimap.pmap(lambda n: os.path.exists(n), ["data/f9.txt", "data/f1.txt"],
                       files=["data"]) == [False, True]


def test_bundled_files_are_read_only_inside_tasks(project, two_nodes):
    def spoil(name):
        with open(name, "a") as fh:
            fh.write("!")

    with pytest.raises(PermissionError, match="bundled files are read-only inside tasks"):
        mpimap.pmap(spoil, ["data/f1.txt"], files=["data"])
    assert mpimap.pmap(read, ["data/f1.txt"], files=["data"])[0][0] == "content 1\n"


def test_scratch_is_private_and_wiped_after_the_map_and_after_an_error(project, two_nodes):
    def use_scratch(i):
        t = mpimap.task()
        with open(os.path.join(t.scratch, "tmp.dat"), "w") as fh:
            fh.write(str(i))
        if i == 5:
            raise ValueError("late failure")
        return t.scratch

    dirs = mpimap.pmap(use_scratch, range(4), chunksize=1)
    assert all("/scratch/" in d for d in dirs) and len(set(dirs)) >= 2
    assert until(lambda: not any(os.path.exists(d) for d in dirs))
    scratch_root = _cache.scratch_root("a")
    with pytest.raises(ValueError, match="late failure"):
        mpimap.pmap(use_scratch, range(8), chunksize=1, files=["table.csv"])
    assert until(lambda: not any(os.listdir(os.path.join(scratch_root, d))
                                 for d in os.listdir(scratch_root)))


def test_bad_files_are_refused_before_any_task_runs(project, two_nodes, tmp_path):
    ran = tmp_path / "ran"

    def mark(x):
        open(ran, "w").close()

    for bad, text in (("/etc/hostname", "absolute path"), ("../x", "outside the current"),
                      ("nope/", "does not exist")):
        with pytest.raises(BundleError, match=text):
            mpimap.pmap(mark, [1], files=[bad])
    assert not ran.exists() and not two_nodes.jobs


def test_a_damaged_transfer_is_received_again(project, two_nodes, monkeypatch):
    real = _bundle.Receiver.feed
    damaged = []

    def flaky(self, data):
        if not damaged and on_a_worker():
            data = bytearray(data)
            data[0] ^= 1
            damaged.append(1)
        return real(self, data)

    monkeypatch.setattr(_bundle.Receiver, "feed", flaky)
    assert mpimap.pmap(read, ["data/f1.txt"], files=["data"])[0][0] == "content 1\n"
    nodes = two_nodes.bundles.log[-1]["nodes"]
    assert sorted(n["attempts"] for n in nodes.values()) == [1, 2]


def test_a_transfer_damaged_every_time_fails_naming_file_and_node(project, two_nodes,
                                                                  monkeypatch):
    real = _bundle.Receiver.feed

    def broken(self, data):
        if on_a_worker():
            data = bytearray(data)
            data[0] ^= 1
        return real(self, data)

    monkeypatch.setattr(_bundle.Receiver, "feed", broken)
    with pytest.raises(BundleError, match=r"data/f0.txt of bundle \w+ failed its sha256 check "
                                          r"on node (a|b) \(rank (1|3)\) twice"):
        mpimap.pmap(read, ["data/f1.txt"], files=["data"])


def test_a_source_file_changing_while_bundled_is_an_error_naming_it(project, two_nodes,
                                                                   monkeypatch):
    real = _bundle.Builder.local_receiver

    def changed_after_hashing(self, bundle):
        with open("data/f3.txt", "r+") as fh:  # rank 0 hashed it; now it changes in place
            fh.write("CONTENT")
        return real(self, bundle)

    monkeypatch.setattr(_bundle.Builder, "local_receiver", changed_after_hashing)
    with pytest.raises(BundleError, match="data/f3.txt changed while mpimap was bundling it"):
        mpimap.pmap(read, ["data/f1.txt"], files=["data"])
    monkeypatch.setattr(_bundle.Builder, "local_receiver", real)
    assert mpimap.pmap(read, ["data/f3.txt"], files=["data"])[0][0] == "CONTENT 3\n"


def test_serial_mode_checks_files_and_runs_in_cwd(project, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    assert mpimap.pmap(read, ["data/f2.txt"], files=["data"]) == [("content 2\n", 0)]
    with pytest.raises(BundleError, match="outside the current directory"):
        mpimap.pmap(read, ["x"], files=["../x"])
    seen = mpimap.pmap(lambda i: mpimap.task().scratch, range(2))
    assert seen[0] == seen[1] and not os.path.exists(seen[0])  # wiped when the map ended




def test_a_full_node_cache_is_an_error_naming_the_directory_and_knob(project, two_nodes,
                                                                    small_fs, tmp_path):
    (project / "big.bin").write_bytes(os.urandom(2 << 20))
    (tmp_path / "cache").mkdir()
    os.symlink(small_fs, tmp_path / "cache" / "b")
    with pytest.raises(BundleError, match=r"node b \(rank 3\): no space left while receiving "
                                          r".* in .*/cache/b .*MPIMAP_CACHE_DIR"):
        mpimap.pmap(read, ["big.bin"], files=["big.bin"])


def test_a_full_scratch_names_the_directory_and_knob(project, two_nodes, small_fs, monkeypatch):
    monkeypatch.setenv("MPIMAP_SCRATCH_DIR", str(small_fs))

    def fill(i):
        with open(os.path.join(mpimap.task().scratch, "big"), "wb") as fh:
            fh.write(b"\0" * (2 << 20))

    with pytest.raises(OSError) as info:
        mpimap.pmap(fill, [1])
    assert info.value.errno == errno.ENOSPC
    assert str(small_fs) in str(info.value) and "MPIMAP_SCRATCH_DIR" in str(info.value)
