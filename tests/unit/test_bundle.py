"""Bundles without MPI: files= resolution, manifest and id, the fast path, safe extraction,
checksums, the cache directory rules, ls/purge, and the detection of local imports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from mpimap import _bundle, _cache, _modules
from mpimap._errors import BundleError, MpimapError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("MPIMAP_CACHE_DIR", str(root))
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A source tree with data files, as a scientist's project folder."""
    p = tmp_path / "proj"
    (p / "data" / "sub").mkdir(parents=True)
    (p / "data" / "a.csv").write_text("x,y\n1,2\n")
    (p / "data" / "b.csv").write_text("x,y\n3,4\n")
    (p / "data" / "sub" / "c.txt").write_text("deep")
    (p / "cal.fits").write_bytes(os.urandom(3000))
    os.symlink("a.csv", p / "data" / "latest.csv")
    monkeypatch.chdir(p)
    return p


def paths(entries):
    return [(e.path, e.type) for e in entries]


# -- files= ---------------------------------------------------------------------------------------

def test_files_resolve_dirs_files_globs_and_links(project):
    entries = _bundle.resolve_files(["data", "cal.fits"], str(project))
    assert paths(entries) == [
        ("files/cal.fits", "file"), ("files/data", "dir"), ("files/data/a.csv", "file"),
        ("files/data/b.csv", "file"), ("files/data/latest.csv", "link"),
        ("files/data/sub", "dir"), ("files/data/sub/c.txt", "file")]
    link = [e for e in entries if e.type == "link"][0]
    assert link.target == "a.csv"
    globbed = _bundle.resolve_files(["data/*.csv", "**/c.txt"], str(project))
    assert [e.path for e in globbed] == ["files/data/a.csv", "files/data/b.csv",
                                         "files/data/latest.csv", "files/data/sub/c.txt"]
    # a single path is accepted as a one-element list; listing a file twice is harmless
    assert paths(_bundle.resolve_files("cal.fits", str(project))) == [("files/cal.fits", "file")]
    assert len(_bundle.resolve_files(["data", "data/a.csv"], str(project))) == len(
        _bundle.resolve_files(["data"], str(project)))


@pytest.mark.parametrize("bad, text", [
    ("missing.csv", "'missing.csv' does not exist"),
    ("data/*.parquet", "matches nothing"),
    ("../outside.txt", "outside the current directory"),
    ("data/../../x", "outside the current directory"),
    ("/etc/hostname", "an absolute path"),
])
def test_bad_files_entries_are_refused_by_name(project, bad, text):
    with pytest.raises(BundleError, match=text) as info:
        _bundle.resolve_files([bad], str(project))
    if "outside" in text or "absolute" in text:
        assert "ln -s" in str(info.value) and "relative" in str(info.value)


def test_files_type_errors_and_special_files(project):
    with pytest.raises(TypeError, match="expected a path"):
        _bundle.resolve_files([3], str(project))
    os.mkfifo(project / "pipe")
    with pytest.raises(BundleError, match="'pipe' is not a regular file"):
        _bundle.resolve_files(["pipe"], str(project))
    os.symlink("nowhere", project / "dangling")
    with pytest.raises(BundleError, match="'dangling' is a link to 'nowhere', which does not"):
        _bundle.resolve_files(["dangling"], str(project))


def test_a_link_inside_cwd_to_a_file_outside_is_how_to_pass_an_outside_file(project, tmp_path):
    outside = tmp_path / "elsewhere.dat"
    outside.write_bytes(b"far away")
    os.symlink(outside, project / "near.dat")
    (e,) = _bundle.resolve_files(["near.dat"], str(project))
    assert (e.path, e.type, e.size) == ("files/near.dat", "file", 8)  # the content travels


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to run as another user")
def test_unreadable_paths_are_bundle_errors_naming_them():
    """As root every file is readable: the check runs as user nobody, for real."""
    top = tempfile.mkdtemp(prefix="mpimap-unreadable-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        os.makedirs(os.path.join(top, "data", "locked"))
        with open(os.path.join(top, "data", "secret.csv"), "w") as fh:
            fh.write("no")
        os.chmod(os.path.join(top, "data", "secret.csv"), 0o600)
        os.chmod(os.path.join(top, "data", "locked"), 0o700)
        code = ("import mpimap,sys\nfor f in sys.argv[1:]:\n try:\n  mpimap.pmap(len, ['x'], "
                "files=[f])\n except mpimap.BundleError as e:\n  print('ERR', e)\n")
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             "-c", code, "data/secret.csv", "data", "data/locked/x"], cwd=top,
            capture_output=True, text=True,
            env={**os.environ, "MPIMAP_SERIAL": "1", "HOME": "/"})
        lines = proc.stdout.splitlines()
        assert lines[0] == "ERR files=: 'data/secret.csv' cannot be read (permission denied)", proc
        assert lines[1] == "ERR files=: the directory 'data/locked' cannot be read (permission denied)", proc
        assert lines[2].startswith("ERR files=: 'data/locked/x' cannot be read (permission denied"), proc
    finally:
        shutil.rmtree(top)


# -- manifest, id, fast path ---------------------------------------------------------------------

def test_same_files_same_id_and_changed_content_new_id(project, cache):
    b = _bundle.Builder()
    one = b.build(_bundle.resolve_files(["data"], str(project)), ["data"], [], [], publish=True)
    again = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    assert one.id == again.id and len(one.id) == 64
    man = _bundle.load_manifest(one.path)
    rec = {e["path"]: e for e in man["entries"]}
    assert rec["files/data/a.csv"] == {
        "path": "files/data/a.csv", "type": "file", "size": 8, "mode": "0644",
        "sha256": hashlib.sha256(b"x,y\n1,2\n").hexdigest()}
    assert man["python"] and man["mpimap"] and man["file_count"] == 3
    assert man["id"] == one.id and man["total_bytes"] == 8 + 8 + 4
    (project / "data" / "b.csv").write_text("x,y\n3,5\n")
    changed = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [],
                                      publish=True)
    assert changed.id != one.id and again.path == one.path
    # the published copy is read-only and has the bundled bytes
    pub = os.path.join(changed.path, "files", "data", "b.csv")
    assert open(pub).read() == "x,y\n3,5\n" and not os.stat(pub).st_mode & 0o222
    assert os.readlink(os.path.join(changed.path, "files", "data", "latest.csv")) == "a.csv"


def test_fast_path_reads_no_file_for_a_known_file_set(project, cache, monkeypatch):
    first = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [],
                                    publish=True)
    reads = []
    real = _bundle._hash_file
    monkeypatch.setattr(_bundle, "_hash_file", lambda *a: reads.append(a) or real(*a))
    # a new process (new Builder) finds the hashes in the cache's index by size+mtime+inode
    second = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    assert second.id == first.id and second.path == first.path and reads == []
    # a touched file is hashed again (only that one): same content, same id, already published
    os.utime(project / "data" / "a.csv", ns=(1, 1))
    third = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    assert third.id == first.id and third.path == first.path
    assert [a[1] for a in reads] == ["files/data/a.csv"]


def test_damaged_published_copy_is_rebuilt(project, cache):
    b = _bundle.Builder()
    one = b.build(_bundle.resolve_files(["data"], str(project)), [], [], [], publish=True)
    victim = os.path.join(one.path, "files", "data", "a.csv")
    with open(victim, "w") as fh:  # root ignores the read-only mode
        fh.write("tampered")
    assert "was changed after it was published" in _bundle.verify_published(one.path, one.id)
    fresh = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [],
                                    publish=True)
    assert fresh.id == one.id and open(victim).read() == "x,y\n1,2\n"
    assert _bundle.verify_published(fresh.path, fresh.id) is None


# -- transfer: pieces, receiver, safety ----------------------------------------------------------

def _receive(root, bundle, piece, corrupt=None):
    rec = _bundle.Receiver(str(root), bundle.id, bundle.manifest, {"test": True})
    for i, view in enumerate(_bundle.pieces(bundle, piece)):
        data = bytearray(view)
        if corrupt == i:
            data[0] ^= 0xFF
        rec.feed(data)
    return rec.finish()


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_pieces_and_receiver_rebuild_the_bundle_exactly(project, cache, tmp_path, piece):
    big = project / "data" / "big.bin"
    big.write_bytes(os.urandom((1 << 20) + 12345))  # big enough for the mmap path
    (project / "data" / "empty").write_bytes(b"")
    one = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    other = tmp_path / "node2"
    path, bad, err = _receive(other, one, piece)
    assert err is None and bad == []
    assert path == _cache.bundle_dir(str(other), one.id)
    for rel in ("data/big.bin", "data/a.csv", "data/empty", "data/sub/c.txt"):
        assert open(os.path.join(path, "files", rel), "rb").read() == (project / rel).read_bytes()
    assert _bundle.verify_published(path, one.id) is None
    man = _bundle.load_manifest(path)
    assert man["staged_by"] == {"test": True} and man["id"] == one.id


def test_checksum_mismatch_names_the_file_and_publishes_nothing(project, cache, tmp_path):
    one = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    path, bad, err = _receive(tmp_path / "node2", one, 4, corrupt=0)
    assert path is None and err is None and bad == ["files/data/a.csv"]
    assert not os.path.exists(_cache.bundle_dir(str(tmp_path / "node2"), one.id))
    assert os.listdir(tmp_path / "node2" / "staging") == []


def _manifest(*entries):
    return {"format": 1, "id": "0" * 64, "entries": list(entries)}


F = {"type": "file", "size": 1, "mode": "0644", "sha256": "a" * 64}


@pytest.mark.parametrize("entry, text", [
    ({"path": "/etc/passwd", **F}, "an absolute path"),
    ({"path": "files/../../x", **F}, r"'\.\.'"),
    ({"path": "files/a/./b", **F}, r"'\.\.', '\.'"),
    ({"path": "elsewhere/x", **F}, "outside files/ and modules/"),
    ({"path": "files/dev", "type": "chardev"}, "device files"),
    ({"path": "files/fifo", "type": "fifo"}, "device files, fifos"),
    ({"path": "files/up", "type": "link", "target": "../../etc/passwd"}, "points outside"),
    ({"path": "files/abs", "type": "link", "target": "/etc/passwd"}, "absolute"),
])
def test_extraction_refuses_unsafe_entries(entry, text, tmp_path):
    with pytest.raises(BundleError, match=text):
        _bundle.check_manifest(_manifest(entry))
    rec = _bundle.Receiver(str(tmp_path), "0" * 64, _manifest(entry), {})
    path, _bad, err = rec.finish()
    assert path is None and isinstance(err, BundleError)
    assert not os.path.exists(tmp_path / "etc")


def test_extraction_refuses_writing_through_a_link():
    with pytest.raises(BundleError, match="below a link"):
        _bundle.check_manifest(_manifest(
            {"path": "files/d", "type": "link", "target": "e"},
            {"path": "files/d/x", **F}))
    with pytest.raises(BundleError, match="listed twice"):
        _bundle.check_manifest(_manifest({"path": "files/x", **F}, {"path": "files/x", **F}))
    # a link to a sibling inside the bundle is fine
    _bundle.check_manifest(_manifest({"path": "files/a/l", "type": "link", "target": "../b"}))


needs_mount = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")




@needs_mount
def test_no_space_on_a_node_names_the_directory_and_the_knob(project, cache, small_fs):
    (project / "data" / "big.bin").write_bytes(os.urandom(2 << 20))
    one = _bundle.Builder().build(_bundle.resolve_files(["data"], str(project)), [], [], [])
    path, _bad, err = _receive(small_fs / "cache", one, 1 << 16)
    assert path is None
    assert "no space left" in str(err) and str(small_fs / "cache") in str(err)
    assert "MPIMAP_CACHE_DIR" in str(err) and "cache purge" in str(err)
    assert os.listdir(small_fs / "cache" / "staging") == []  # the partial copy is gone


# -- the cache directory ---------------------------------------------------------------------------

def test_cache_dir_is_created_0700_and_node_placeholder_expands(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMAP_CACHE_DIR", str(tmp_path / "c" / "{node}"))
    monkeypatch.setenv("SLURMD_NODENAME", "n7")
    root = _cache.cache_root()
    assert root == str(tmp_path / "c" / "n7")
    assert os.stat(root).st_mode & 0o777 == 0o700
    monkeypatch.setenv("MPIMAP_CACHE_DIR", "relative/dir")
    with pytest.raises(ValueError, match="MPIMAP_CACHE_DIR.*absolute path"):
        _cache.cache_root()


def test_cache_dir_of_another_user_or_writable_by_others_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    monkeypatch.setenv("MPIMAP_CACHE_DIR", str(d))
    os.chmod(d, 0o777)
    with pytest.raises(BundleError, match=r"writable by group and others \(mode 0777\).*"
                                          r"chmod 700.*MPIMAP_CACHE_DIR"):
        _cache.cache_root()
    os.chmod(d, 0o700)
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)
        with pytest.raises(BundleError, match="owned by uid 65534, not by you.*MPIMAP_CACHE_DIR"):
            _cache.cache_root()
    scratch = tmp_path / "scratch"
    (scratch / f"mpimap-{os.geteuid()}").mkdir(parents=True)
    os.chmod(scratch / f"mpimap-{os.geteuid()}", 0o777)
    monkeypatch.setenv("MPIMAP_SCRATCH_DIR", str(scratch))
    with pytest.raises(MpimapError, match="mode 0777.*MPIMAP_SCRATCH_DIR"):
        _cache.scratch_root()


def test_scratch_goes_under_slurm_tmpdir_unless_the_knob_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MPIMAP_SCRATCH_DIR", raising=False)
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "job42"))
    assert _cache.scratch_root() == str(tmp_path / "job42" / f"mpimap-{os.geteuid()}")
    monkeypatch.setenv("MPIMAP_SCRATCH_DIR", str(tmp_path / "fast"))
    assert _cache.scratch_root() == str(tmp_path / "fast" / f"mpimap-{os.geteuid()}")


def test_ls_purge_by_age_keep_what_is_in_use(project, cache):
    b = _bundle.Builder()
    old = b.build(_bundle.resolve_files(["data"], str(project)), [], [], [], publish=True)
    new = b.build(_bundle.resolve_files(["cal.fits"], str(project)), [], [], [], publish=True)
    busy = b.build(_bundle.resolve_files(["data/sub"], str(project)), [], [], [], publish=True)
    root = str(cache)
    ten_days = time.time() - 10 * 86400
    for bid in (old.id, busy.id):
        os.utime(_cache.stamp_path(root, bid), (ten_days, ten_days))
    for fd in b.locks.values():  # the builder holds its bundles; let go of all but `busy`
        os.close(fd)
    b.locks.clear()
    holder = _cache.lock_shared(busy.path)
    found = {e.id: e for e in _cache.entries(root)}
    assert set(found) == {old.id, new.id, busy.id}
    assert found[new.id].size == 3000 and found[old.id].files == 3 and found[busy.id].in_use
    dry = _cache.purge(root, older_than=_cache.parse_age("7d"), dry_run=True)
    assert [e.id for e in dry["removed"]] == [old.id] and os.path.isdir(old.path)
    done = _cache.purge(root, older_than=_cache.parse_age("7d"))
    assert [e.id for e in done["removed"]] == [old.id] and [e.id for e in done["in_use"]] == [busy.id]
    assert not os.path.exists(old.path) and not os.path.exists(old.path + ".used")
    assert os.path.isdir(busy.path) and os.path.isdir(new.path)
    os.close(holder)
    done = _cache.purge(root, everything=True)
    assert {e.id for e in done["removed"]} == {new.id, busy.id} and not _cache.entries(root)


def test_purge_removes_what_dead_processes_left(cache, tmp_path):
    root = _cache.cache_root()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = os.path.join(root, "staging", f"{'ab' * 8}.{_cache.node_name()}.{dead}.x1")
    os.makedirs(stale)
    mine = _cache.new_staging(root, "cd" * 32)
    scratch = tmp_path / "scr"
    (scratch / f"r3-{dead}" / "j1" / "scratch").mkdir(parents=True)
    (scratch / f"r3-{dead}" / "j1" / "scratch" / "f").write_bytes(b"12345")
    (scratch / f"r4-{os.getpid()}").mkdir()
    done = _cache.purge(root, everything=True, scratch=str(scratch))
    assert sorted(p for p, _n in done["stale"]) == sorted([stale, str(scratch / f"r3-{dead}")])
    assert not os.path.exists(stale) and os.path.exists(mine)
    assert (scratch / f"r4-{os.getpid()}").exists() and done["freed"] == 5


def test_parse_age_and_human():
    assert _cache.parse_age("7d") == 7 * 86400 and _cache.parse_age("90m") == 5400
    with pytest.raises(ValueError, match="7d, 12h"):
        _cache.parse_age("7 days")
    assert _cache.human(1536) == "1.5 KiB" and _cache.human(10) == "10 B"


def test_cli_cache_ls_purge_and_bundle_inspect(project, cache, capsys):
    from mpimap import cli

    builder = _bundle.Builder()
    one = builder.build(_bundle.resolve_files(["data"], str(project)), ["data"], [], [],
                        publish=True)
    assert cli.main(["cache", "ls", "--sort", "size"]) == 0
    out = capsys.readouterr().out
    assert one.id[:12] in out and "1 bundle, 20 B in all" in out and str(cache) in out
    assert cli.main(["bundle", "inspect", one.id[:8]]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man["id"] == one.id and man["files"] == ["data"]
    assert cli.main(["bundle", "inspect", os.path.join(one.path, "manifest.json")]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == one.id
    assert cli.main(["bundle", "inspect", "ffff"]) == 2
    assert "no bundle ffff" in capsys.readouterr().err
    assert cli.main(["cache", "purge", "--older-than", "soon"]) == 2
    assert "write a number and a unit" in capsys.readouterr().err
    assert cli.main(["cache", "purge", "--all"]) == 0  # rank 0's builder still holds it
    assert f"kept {one.id[:12]}: in use" in capsys.readouterr().out
    for fd in builder.locks.values():
        os.close(fd)
    assert cli.main(["cache", "purge", "--all"]) == 0
    assert "removed 1 bundle, 20 B" in capsys.readouterr().out
    assert not os.path.exists(one.path)


# -- modules ----------------------------------------------------------------------------------------

@pytest.fixture
def src_tree(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "mypkg").mkdir(parents=True)
    (src / "mypkg" / "__init__.py").write_text("from .core import scale\n")
    (src / "mypkg" / "core.py").write_text("import util_x\ndef scale(v):\n    return util_x.k() * v\n")
    (src / "mypkg" / "table.csv").write_text("a,b\n")
    (src / "util_x.py").write_text("import numpy\ndef k():\n    return 3\n")
    (src / "lonely_y.py").write_text("def f():\n    return 1\n")
    (src / "lazy_z.py").write_text("V = 5\n")
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.chdir(tmp_path)
    yield src
    for name in ("mypkg", "mypkg.core", "util_x", "lonely_y", "lazy_z"):
        sys.modules.pop(name, None)


def test_detects_local_imports_transitively_not_installed_ones(src_tree):
    import mypkg

    ns = {"mypkg": mypkg, "np": __import__("numpy")}
    exec(textwrap.dedent("""
        def f(x):
            import lazy_z
            return mypkg.scale(x) + np.sqrt(x) + lazy_z.V
    """), ns)
    found = _modules.detect([ns["f"]], roots=[str(src_tree.parent)])
    assert [(t, k) for t, k, _p in found] == [("lazy_z", "module"), ("mypkg", "package"),
                                             ("util_x", "module")]
    # mpimap itself is an editable install here: installed, never shipped; numpy neither
    assert _modules.detect([lambda x: __import__("mpimap").task()],
                           roots=[str(src_tree.parent)]) == []


def test_detects_through_closures_defaults_and_instances(src_tree):
    import lonely_y

    def outer(g=lonely_y.f):
        def inner(x):
            return g() + x
        return inner

    found = _modules.detect([outer()], roots=[str(src_tree.parent)])
    assert [t for t, _k, _p in found] == ["lonely_y"]


def test_explicit_modules_resolve_and_refuse_installed_ones(src_tree):
    found, explicit = _modules.resolve(["mypkg.core"], roots=[str(src_tree.parent)])
    assert [t for t, _k, _p in found] == ["mypkg", "util_x"] and explicit == {"mypkg"}
    with pytest.raises(BundleError, match="'numpy' is installed.*Install 'numpy'"):
        _modules.resolve(["numpy"])
    with pytest.raises(BundleError, match="built into Python"):
        _modules.resolve(["sys"])
    with pytest.raises(BundleError, match="no module named 'nope_nope'"):
        _modules.resolve(["nope_nope"])
    with pytest.raises(TypeError, match="modules=: expected a module name"):
        _modules.resolve([3])
    entries = _bundle.module_entries(found)
    assert "modules/mypkg/table.csv" in [e.path for e in entries]  # package data comes along
    assert "modules/util_x.py" in [e.path for e in entries]
