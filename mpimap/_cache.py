"""Where bundles and per-rank directories live on a node, who may own them, and cache upkeep.

    $MPIMAP_CACHE_DIR (default /tmp/mpimap-<uid>)     node-local, outlives the job; 0700, yours
      bundles/<id[:2]>/<id>/          a published bundle, read-only (files 0444/0555, dirs 0555)
          manifest.json               its shared flock(2) means "in use": purge skips it
          files/...                   the files= tree, by the paths relative to rank 0's cwd
          modules/...                 a sys.path entry: the shipped modules and packages
      bundles/<id[:2]>/<id>.used      last-use stamp, touched at each use (atime is unreliable:
                                      relatime/noatime mounts); beside the bundle, which is
                                      read-only
      staging/<id>.<node>.<pid>.<random>/   a bundle being built or received; renamed into place
      hashes.json                     rank 0's (size, mtime, inode) -> sha256 index: the fast path

    $MPIMAP_SCRATCH_DIR, else $SLURM_TMPDIR, else the system temporary directory
      mpimap-<uid>/                   0700, yours
        r<rank>-<pid>/j<job>/work     per-rank working directory of a map with files=
                            /scratch  mpimap.task().scratch
                            /out      output files of finished tasks waiting to go to rank 0

Why the cache is not in $SLURM_TMPDIR: sites delete that directory when the job ends, and the
point of a content-addressed cache is that the next job finds the bundle already there.  Why
/tmp/mpimap-<uid> and not $TMPDIR: many sites point TMPDIR at the same per-job directory.

Why owner and mode are checked: /tmp is shared by every user of a node.  Another user could create
/tmp/mpimap-<uid> first and plant a bundle -- a module there runs inside your tasks.  ``mkdir``
with mode 0700 does not fail when the directory exists, so after it the directory must be owned by
this user and not writable by group or others; otherwise the knob to move it is named.  The ids
fan out by their first two hex digits (256 subdirectories), so no directory grows huge.

Publishing is one ``rename(2)`` of a complete staging directory, so a reader sees a whole bundle or
none; two ranks publishing the same id at once both succeed (the loser discards its copy).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass

from ._env import knob
from ._errors import BundleError, MpimapError

__all__ = ["CacheEntry", "cache_root", "entries", "human", "parse_age", "purge", "scratch_root"]

ID_RE = re.compile(r"^[0-9a-f]{64}$")


def node_name() -> str:
    """Slurm's node name when set (fake nodes of one host differ only there), else the host."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _expand(template: str, node: str | None) -> str:
    return template.replace("{node}", node or node_name())


def secure_dir(path: str, knob_name: str, error=BundleError) -> str:
    """Create ``path`` 0700 if needed; refuse one owned by someone else or writable by others."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create the directory {path}: {exc.strerror or exc}. Set {knob_name} "
                    f"to a node-local directory you can write.") from None
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is not a directory; set {knob_name} to another path")
    if st.st_uid != os.geteuid():
        raise error(f"{path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}): "
                    f"another user could plant files or modules there. Set {knob_name} to a "
                    f"directory of your own.")
    if st.st_mode & 0o022:
        raise error(f"{path} is writable by {'group and others' if st.st_mode & 0o002 else 'its group'} "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}): another user could plant files or "
                    f"modules there. Run `chmod 700 {path}` or set {knob_name} to a directory of "
                    f"your own.")
    return path


def cache_root(node: str | None = None, create: bool = True) -> str:
    template = knob("MPIMAP_CACHE_DIR") or f"/tmp/mpimap-{os.geteuid()}"
    path = _expand(template, node)
    return secure_dir(path, "MPIMAP_CACHE_DIR") if create else path


def scratch_base(node: str | None = None) -> tuple[str, str]:
    """(directory the per-rank directories go under, what sets it) -- before the mpimap-<uid>."""
    template = knob("MPIMAP_SCRATCH_DIR")
    if template:
        return _expand(template, node), "MPIMAP_SCRATCH_DIR"
    if os.environ.get("SLURM_TMPDIR"):
        return os.environ["SLURM_TMPDIR"], "SLURM_TMPDIR (move it with MPIMAP_SCRATCH_DIR)"
    return tempfile.gettempdir(), "the system temporary directory (move it with MPIMAP_SCRATCH_DIR)"


_roots: dict = {}  # scratch roots this process has checked, by what decides them


def scratch_root(node: str | None = None) -> str:
    """The per-user scratch root, created and checked once per process: every rank asks for it
    at every map, which must stay cheap (a warm pool maps thousands of times a second)."""
    key = (node or node_name(), os.environ.get("MPIMAP_SCRATCH_DIR"),
           os.environ.get("SLURM_TMPDIR"), os.environ.get("TMPDIR"))
    path = _roots.get(key)
    if path is None:
        base, _why = scratch_base(node)
        path = secure_dir(os.path.join(base, f"mpimap-{os.geteuid()}"), "MPIMAP_SCRATCH_DIR",
                          error=MpimapError)
        _roots[key] = path
    return path


# ----------------------------------------------------------------------------------------------
# Bundle paths, publishing, locks, stamps

def bundle_dir(root: str, bid: str) -> str:
    return os.path.join(root, "bundles", bid[:2], bid)


def stamp_path(root: str, bid: str) -> str:
    return bundle_dir(root, bid) + ".used"


def new_staging(root: str, bid: str) -> str:
    parent = os.path.join(root, "staging")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{bid[:16]}.{node_name()}.{os.getpid()}.", dir=parent)


def publish(staging: str, root: str, bid: str) -> tuple[str, bool]:
    """Rename a complete staging directory into place: (path, True if ours is the one kept)."""
    final = bundle_dir(root, bid)
    os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
    try:
        os.rename(staging, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        remove_tree(staging)
        return final, False
    os.chmod(final, 0o555)
    touch(root, bid)
    return final, True


def discard(root: str, bid: str) -> None:
    """Remove a damaged published bundle (even in use: its users read wrong bytes anyway)."""
    path = bundle_dir(root, bid)
    trash = os.path.join(root, "staging", f"trash.{bid}.{os.getpid()}.{time.monotonic_ns()}")
    os.makedirs(os.path.dirname(trash), mode=0o700, exist_ok=True)
    try:
        os.chmod(path, 0o700)
        os.rename(path, trash)
    except OSError:
        return
    remove_tree(trash)


def touch(root: str, bid: str) -> None:
    """The last-use stamp; best effort (a read-only cache still works)."""
    path = stamp_path(root, bid)
    try:
        with open(path, "a"):
            pass
        os.utime(path)
    except OSError:
        pass


def lock_shared(path: str) -> int | None:
    """Hold a shared lock on a published bundle (purge skips it); None if it is not there.

    The lock is on manifest.json; after taking it the path must still lead to the same file,
    otherwise a purge moved the bundle away between our open and our lock.
    """
    manifest = os.path.join(path, "manifest.json")
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_ino != os.stat(manifest).st_ino:
            raise OSError("moved")
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_tree(path: str) -> None:
    """rmtree that also works on our read-only trees (unlinking needs write on the directory)."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        for dirpath, dirnames, _files in os.walk(path):
            for name in dirnames:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    try:
                        os.chmod(p, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------
# mpimap cache ls / purge

@dataclass
class CacheEntry:
    id: str
    path: str
    size: int
    files: int
    created: float
    last_used: float
    in_use: bool
    python: str = ""


def _in_use(path: str) -> bool:
    try:
        fd = os.open(os.path.join(path, "manifest.json"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def entries(root: str) -> list[CacheEntry]:
    """Every published bundle under ``root`` (unsorted)."""
    out = []
    base = os.path.join(root, "bundles")
    if not os.path.isdir(base):
        return out
    for fan in sorted(os.listdir(base)):
        fan_dir = os.path.join(base, fan)
        if not os.path.isdir(fan_dir):
            continue
        for name in os.listdir(fan_dir):
            path = os.path.join(fan_dir, name)
            if not ID_RE.match(name) or not os.path.isdir(path):
                continue
            try:
                with open(os.path.join(path, "manifest.json")) as fh:
                    man = json.load(fh)
            except (OSError, ValueError):
                man = {}
            try:
                used = os.stat(path + ".used").st_mtime
            except OSError:
                used = os.stat(path).st_mtime
            out.append(CacheEntry(name, path, int(man.get("total_bytes", 0)),
                                  int(man.get("file_count", 0)),
                                  float(man.get("published", 0)) / 1e9 or os.stat(path).st_mtime,
                                  used, _in_use(path), man.get("python", "")))
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def leftovers(root: str, scratch: str | None) -> list[tuple[str, int]]:
    """Staging directories and per-rank directories whose process is gone (this node only)."""
    found = []
    me = node_name()
    staging = os.path.join(root, "staging")
    if os.path.isdir(staging):
        for name in os.listdir(staging):
            parts = name.split(".")
            path = os.path.join(staging, name)
            if name.startswith("trash."):
                found.append((path, _dir_bytes(path)))
            elif len(parts) >= 4 and parts[-2].isdigit() and ".".join(parts[1:-2]) == me \
                    and not _pid_alive(int(parts[-2])):
                found.append((path, _dir_bytes(path)))
    if scratch and os.path.isdir(scratch):
        for name in os.listdir(scratch):
            m = re.match(r"^r\d+-(\d+)$", name)
            if m and not _pid_alive(int(m.group(1))):
                path = os.path.join(scratch, name)
                found.append((path, _dir_bytes(path)))
    return found


def purge(root: str, older_than: float | None = None, everything: bool = False,
          dry_run: bool = False, scratch: str | None = None) -> dict:
    """Remove bundles last used more than ``older_than`` seconds ago (or all), never one in use.

    Also removes what crashed processes left on this node: staging directories and per-rank
    working/scratch directories whose process is gone.
    """
    now = time.time()
    removed, busy = [], []
    for e in entries(root):
        if not everything and (older_than is None or now - e.last_used < older_than):
            continue
        manifest = os.path.join(e.path, "manifest.json")
        try:
            fd = os.open(manifest, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                busy.append(e)
                continue
            removed.append(e)
            if dry_run:
                continue
            # Move it out of sight under the lock, so nobody can start using it; delete after.
            trash = os.path.join(root, "staging", f"trash.{e.id}.{os.getpid()}")
            os.makedirs(os.path.dirname(trash), mode=0o700, exist_ok=True)
            os.chmod(e.path, 0o700)
            os.rename(e.path, trash)
        finally:
            os.close(fd)
        remove_tree(trash)
        remove_tree(e.path + ".used")
    stale = [] if not (everything or older_than is not None) else leftovers(root, scratch)
    if not dry_run:
        for path, _n in stale:
            remove_tree(path)
    return {"removed": removed, "in_use": busy, "stale": stale,
            "freed": sum(e.size for e in removed) + sum(n for _p, n in stale)}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '45s', '2w' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise ValueError(f"--older-than {text!r}: write a number and a unit, e.g. 7d, 12h, 30m, "
                         f"45s or 2w")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
