"""A worker's per-rank directories for one map, and what tasks leave in them.

    <scratch root>/r<rank>-<pid>/j<job>/        (scratch root: see _cache; under $SLURM_TMPDIR)
        work/      the cwd of the tasks of a map with files=: one link per top-level entry of
                   the bundle's files/ (read-only, shared by the ranks of the node), so
                   open("data/a.csv") reads the bundled copy; plus whatever tasks create
        scratch/   mpimap.task().scratch, made on first use
        out/<n>/   outputs moved out of work/ after each task, until they leave with the chunk

    task i returns or raises ──▶ collect(): every entry of work/ that is not a bundle link is
        moved to out/<n>/ (one rename) and recorded with item i ──▶ the chunk's RESULT carries
        the records and the bytes ──▶ rank 0 writes them under its own cwd (_stage)

After each collect the working directory holds only the bundle's links again, so each output is
attributed to exactly one item -- that is what lets rank 0 name both items of a clash.  Nothing a
task created is deleted before it has been sent; the job directory itself is removed when the map
ends (a DROP from rank 0), when it is cancelled, and the rank's directory when the worker exits.

Hints.  An audit hook (``sys.addaudithook``; hooks cannot be removed, so it returns at once
outside a task of a worker) turns a read of a missing relative path into a FileNotFoundError
that says to add the path to files=, and refuses a write into the bundle with a PermissionError
(the read-only modes do not stop a task running as root, and the bundle is shared by every rank
of the node and by later jobs).  Files that C libraries open (HDF5...) do not pass through the
hook; their FileNotFoundError gets the hint when it reaches the worker loop.  A task's
ENOSPC/EDQUOT inside these directories is re-raised naming the directory and the knob to move it.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import sys
import threading
from contextlib import contextmanager

from . import _cache, _task

__all__ = ["JobDirs", "explain", "install_hook"]

_CWD_LOCK = threading.RLock()  # in-process workers are threads of one process: one cwd
_hooked = False


class JobDirs:
    """The directories of one map on one worker rank."""

    def __init__(self, rank: int, job: int, node: str, bundle_path: str | None = None,
                 top=(), bundle_id: str = ""):
        self.rank = rank
        self.job = job
        self.node = node
        self._base = None
        self.work = os.path.join(self.base, "work") if bundle_path else None
        self.bundle = bundle_path
        self.bundle_real = os.path.realpath(bundle_path) if bundle_path else None
        self.bundle_id = bundle_id
        self.links = set(top)
        self.records: list = []
        self.seq = 0
        self.used = False  # mpimap.task().scratch was asked for
        if self.work is not None:
            try:
                os.makedirs(self.work, mode=0o700)
                for name in top:
                    os.symlink(os.path.join(bundle_path, "files", name),
                               os.path.join(self.work, name))
            except OSError as exc:
                raise _space_error(exc, self.base, "setting up the working directory") \
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc

    @property
    def base(self) -> str:
        """Computed on first use: a map without files= that never asks for scratch never
        touches the scratch root (nor fails on a badly set one)."""
        if self._base is None:
            self._base = _task.job_dir(self.job, self.rank, self.node)
        return self._base

    @property
    def out(self) -> str:
        return os.path.join(self.base, "out")

    def touched(self) -> bool:
        """Is there anything on disk to remove? Known without a system call: a map without
        files= has a directory only once a task asked for its scratch."""
        return self.work is not None or self.used

    def exists(self) -> bool:
        if not self.touched():
            return False
        try:
            return os.path.isdir(self.base)
        except Exception:
            return False

    @contextmanager
    def cwd(self, serialize: bool):
        """Run a chunk with the working directory as cwd (and put the old one back)."""
        if self.work is None:
            yield
            return
        lock = _CWD_LOCK if serialize else None
        if lock is not None:
            lock.acquire()
        old = os.getcwd()
        try:
            os.chdir(self.work)
            yield
        finally:
            os.chdir(old)
            if lock is not None:
                lock.release()

    def collect(self, item: int) -> None:
        """Move what the task of ``item`` created in work/ to out/, recorded under ``item``."""
        try:
            names = [n for n in os.listdir(self.work) if n not in self.links]
        except OSError:
            return
        if not names:
            return
        self.seq += 1
        dest = os.path.join(self.out, str(self.seq))
        os.makedirs(dest, mode=0o700, exist_ok=True)
        for name in names:
            os.rename(os.path.join(self.work, name), os.path.join(dest, name))
        for dirpath, dirnames, filenames in os.walk(dest):
            rel_dir = os.path.relpath(dirpath, dest)
            for name in sorted(dirnames):
                p = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                if os.path.islink(p):
                    self.records.append((rel, item, "link", 0, os.readlink(p), None))
                elif not os.listdir(p):
                    self.records.append((rel, item, "dir", 0, "", None))
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                rel = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    self.records.append((rel, item, "link", 0, os.readlink(p), None))
                elif stat.S_ISREG(st.st_mode):
                    self.records.append((rel, item, "file", stat.S_IMODE(st.st_mode), "", p))
                # fifos and sockets a task made are not data: not sent

    def take(self):
        """(records, byte buffers) of the outputs collected so far; the files are unlinked (the
        buffers are mappings of them, alive until sent)."""
        records, self.records = self.records, []
        buffers = []
        out = []
        for rel, item, kind, mode, target, path in records:
            data = None
            if kind == "file":
                with open(path, "rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    data = mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) if size >= 65536 \
                        else fh.read()
                buffers.append(data)
            out.append((rel.replace(os.sep, "/"), item, kind, mode, target, data is not None))
        if records:
            _cache.remove_tree(self.out)
        return out, buffers

    def remove(self) -> None:
        if self._base is not None:
            _cache.remove_tree(self._base)


def wrap(func, dirs: JobDirs):
    """The task function, followed by collecting what it created (also when it raised)."""

    def run_in_working_directory(*args):
        try:
            return func(*args)
        finally:
            state = _task.current()
            dirs.collect(state.index if state is not None else -1)

    return run_in_working_directory


# ----------------------------------------------------------------------------------------------
# Hints

def _space_error(exc: OSError, where: str, what: str) -> OSError:
    base, why = _cache.scratch_base()
    text = (f"{exc.strerror or 'No space left on device'} while {what}: the per-rank working/"
            f"scratch directory {where} is full (it lies under {base}, from {why}). Point "
            f"MPIMAP_SCRATCH_DIR at a node-local directory with more room.")
    try:
        new = type(exc)(exc.errno, text, exc.filename)
    except Exception:
        new = OSError(exc.errno, text, exc.filename)
    new.__traceback__ = exc.__traceback__
    return new


def explain(exc: BaseException, dirs: JobDirs | None) -> BaseException:
    """A task's exception, with the hint mpimap can add (ENOSPC in our dirs, a missing file)."""
    if dirs is None or not isinstance(exc, OSError):
        return exc
    name = exc.filename if isinstance(exc.filename, str) else None
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        if not dirs.exists():
            return exc
        root = os.path.dirname(os.path.dirname(dirs.base))
        if name is None or os.path.realpath(os.path.join(dirs.work or os.getcwd(), name)) \
                .startswith(os.path.realpath(root) + os.sep):
            return _space_error(exc, dirs.base, "a task was writing")
    elif isinstance(exc, FileNotFoundError) and "files=" not in str(exc) and \
            (name is None or not os.path.isabs(name)):
        what = f"{name!r}" if name else "the file"
        hint = (f"{exc.strerror or exc}: {what} is not in this map's bundle; if it is an input "
                f"on rank 0, add it to files= (paths relative to rank 0's current directory)"
                if dirs.work else
                f"{exc.strerror or exc} (on node {dirs.node}); if {what} is an input on rank 0, "
                f"pass it with files= so mpimap ships it to every node")
        try:
            new = type(exc)(exc.errno or errno.ENOENT, hint, exc.filename)
        except Exception:
            return exc
        new.__traceback__ = exc.__traceback__
        return new
    return exc


def _missing(path: str) -> bool:
    """Only a path that does not exist (not one we may not read: open says that itself)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _audit(event, args):
    if event != "open":
        return
    state = _task.current()
    if state is None:
        return
    dirs = getattr(state, "dirs", None)
    if dirs is None:
        return
    path, _mode, flags = args
    if not isinstance(path, (str, bytes)):
        return
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if (flags & os.O_ACCMODE) == os.O_RDONLY and not flags & os.O_CREAT:
        if not os.path.isabs(path) and _missing(path):
            if dirs.work is not None:
                text = (f"No such file or directory in the task's working directory: {path!r} is "
                        f"not in this map's bundle. Add it to files= (paths relative to rank 0's "
                        f"current directory) so tasks can open it by this path")
            else:
                text = (f"No such file or directory on node {dirs.node} (tasks run in "
                        f"{os.getcwd()}). If {path!r} is an input file on rank 0, pass it with "
                        f"files=[{path!r}] so mpimap ships it to every node")
            raise FileNotFoundError(errno.ENOENT, text, path)
    elif dirs.bundle_real is not None:
        real = os.path.realpath(path)
        if real.startswith(dirs.bundle_real + os.sep):
            raise PermissionError(
                errno.EACCES, "bundled files are read-only inside tasks (every rank of the node "
                "and later jobs share them). Write outputs under a new name in the working "
                "directory -- they come back to rank 0's current directory -- or use "
                "mpimap.task().scratch for temporary files", path)


def install_hook() -> None:
    global _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
