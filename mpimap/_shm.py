"""Node-shared memory segments: the pages that hold one node's copy of large arrays.

A *segment* is a file in memory that one rank of a node (the node's receiver) fills and every
other rank of the node maps::

    receiver: create (memfd, or a 0600 file in /dev/shm) ──pwrite──▶ pages in the page cache
              locator (pid, fd | path, inode) ──▶ the node's other ranks
    others:   open the locator ──mmap──▶ the same physical pages (read-only, or copy-on-write)
    release:  the receiver closes its fd (and unlinks the name) once every rank of the node has
              mapped it; the memory goes when the last mapping does (arrays garbage-collected)

Why these choices (measured on the 2-core test VM, 1 GiB, shmem without huge pages):

* ``pwrite`` into the file, never stores through a fresh mapping: a store to an unmapped page of
  a shared mapping costs a page fault per 4 KiB (1.2-1.4 s/GiB), while ``pwrite`` fills the page
  cache inside the kernel (about 0.6 s/GiB, allocation included). Readers map with
  ``MAP_POPULATE`` (0.15 s/GiB) so no task pays faults later.
* memfd (``memfd_create``) first: the segment has no name anywhere, so nothing can ever be left
  behind, whatever kills the processes; the other ranks open it through
  ``/proc/<pid>/fd/<fd>`` (same user: no privilege needed), checked by inode so a reused fd
  number can never hand over the wrong file. Where that is not possible (no memfd_create, a /proc
  that hides the receiver, ranks in separate pid namespaces) a file in /dev/shm is used instead,
  created 0600 and O_EXCL with an unguessable name and unlinked as soon as every rank of the node
  has mapped it. An MPI-3 shared window (``Win.Allocate_shared``) was rejected: freeing it is
  collective over the node, so one rank busy in an hour-long task would pin the memory (and block
  rank 0) for that hour, and MPICH backs it with its own /dev/shm file that a SIGKILL leaves.
* Common data is mapped ``PROT_READ``: numpy arrays built on it are read-only and cannot be made
  writeable. Arrays a function captures are mapped ``MAP_PRIVATE`` (copy-on-write): they share
  the pages until a task writes into one, which then gets a private copy of that page only --
  the same semantics the user had before (a writable private array), one copy per node.

This module is a leaf: stdlib only, no MPI. ``_nodeshare`` drives it over the communicators.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
import secrets
import struct
from typing import NamedTuple

__all__ = ["KINDS", "Segment", "ShareUnavailable", "failing_pickle", "layout", "leftovers",
           "open_located", "pack_locator", "probe_check", "probe_create", "unpack_locator"]

KINDS = ("memfd", "file")
ALIGN = 64  # cache line: numpy's vector loops need no more, and padding stays negligible
PREFIX = "mpimap-"
SHM_DIR = "/dev/shm"
LOCATOR_BYTES = 1024
_WRITE_MAX = 1 << 30  # Linux moves at most 0x7ffff000 bytes per write(2)


class ShareUnavailable(RuntimeError):
    """Shared memory for a segment could not be made or mapped; the message names the fix."""


def _fail(message):
    raise ShareUnavailable(message)


def failing_pickle(message: str) -> bytes:
    """A pickle stream whose loading raises ShareUnavailable(message) (stands in for a payload
    whose shared buffers could not be delivered, so the error surfaces where it is loaded)."""
    return pickle.dumps(_Failing(message), protocol=5)


class _Failing:
    def __init__(self, message):
        self.message = message

    def __reduce__(self):
        return (_fail, (self.message,))


def layout(sizes, align: int = ALIGN):
    """Offsets of buffers of ``sizes`` packed into one segment, each aligned; (offsets, total)."""
    offsets = []
    pos = 0
    for n in sizes:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += n
    return offsets, pos


def token() -> str:
    return secrets.token_hex(8)


_libc_memfd = None


def _memfd_create(name: str) -> int:
    """memfd_create(2): os.memfd_create, or libc's own where Python was built without it
    (conda's Python is built against an old glibc)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name, os.MFD_CLOEXEC)
    global _libc_memfd
    if _libc_memfd is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _libc_memfd = getattr(libc, "memfd_create", False)
        if _libc_memfd:
            _libc_memfd.argtypes = [ctypes.c_char_p, ctypes.c_uint]
            _libc_memfd.restype = ctypes.c_int
    if not _libc_memfd:
        raise OSError(errno.ENOSYS, "memfd_create is not available on this system")
    fd = _libc_memfd(name.encode(), 1)  # MFD_CLOEXEC
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


class Segment:
    """The receiver's handle on a segment it created: write into it, locate it, release it."""

    def __init__(self, kind: str, size: int, name: str | None = None):
        self.kind = kind
        self.size = size
        self.path = None
        tok = name or token()
        if kind == "memfd":
            self.fd = _memfd_create(PREFIX + tok)
        elif kind == "file":
            if not os.path.isdir(SHM_DIR):
                raise OSError(errno.ENOENT, f"{SHM_DIR} does not exist")
            self.path = os.path.join(SHM_DIR, f"{PREFIX}{os.getuid()}-{tok}")
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600)
        else:
            raise ValueError(f"unknown segment kind {kind!r}")
        try:
            os.ftruncate(self.fd, size)
            st = os.fstat(self.fd)
        except BaseException:
            self.release()
            raise
        self.ident = (st.st_dev, st.st_ino)

    def write(self, offset: int, data) -> None:
        """Copy ``data`` (any buffer) to ``offset``: pwrite, so no page of ours is faulted in."""
        view = memoryview(data).cast("B")
        done = 0
        n = view.nbytes
        while done < n:
            done += os.pwrite(self.fd, view[done:done + _WRITE_MAX], offset + done)

    def locator(self) -> tuple:
        if self.kind == "memfd":
            return ("memfd", os.getpid(), self.fd, self.ident, self.size)
        return ("file", self.path, self.ident, self.size)

    def map(self, access: str) -> mmap.mmap:
        return _map(self.fd, self.size, access)

    def unlink(self) -> None:
        """Remove the name (file kind); mappings and open fds keep the memory."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def release(self) -> None:
        self.unlink()
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


def _map(fd: int, size: int, access: str) -> mmap.mmap:
    if access == "read":
        # Populate now: the page-table work is done once, here, not by the first task.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    if access == "copy":
        # Never MAP_POPULATE a private writable mapping: populating it breaks copy-on-write
        # for every page (a full private copy).
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raise ValueError(f"unknown access {access!r}")


def open_located(loc: tuple, access: str) -> mmap.mmap:
    """Map the segment a receiver announced; raises OSError if it is gone or is not that file."""
    kind = loc[0]
    if kind == "memfd":
        _k, pid, fd, ident, size = loc
        path = f"/proc/{pid}/fd/{fd}"
    elif kind == "file":
        _k, path, ident, size = loc
    else:
        raise ValueError(f"not a segment locator: {loc!r}")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(ident) or st.st_size != size:
            raise OSError(errno.ESTALE, f"{path} is no longer the segment announced")
        return _map(fd, size, access)
    finally:
        os.close(fd)  # the mapping keeps the pages


_LOC = struct.Struct("<I")


def pack_locator(loc: tuple) -> bytearray:
    """A fixed-size message (so the receiver can post its receive before it is sent)."""
    data = pickle.dumps(loc, protocol=5)
    if len(data) > LOCATOR_BYTES - _LOC.size:
        if loc[0] != "error":
            raise ValueError("segment locator too long")
        data = pickle.dumps(("error", loc[1][:LOCATOR_BYTES // 2]), protocol=5)
    buf = bytearray(LOCATOR_BYTES)
    _LOC.pack_into(buf, 0, len(data))
    buf[_LOC.size:_LOC.size + len(data)] = data
    return buf


def unpack_locator(buf) -> tuple:
    (n,) = _LOC.unpack_from(buf, 0)
    return pickle.loads(bytes(buf[_LOC.size:_LOC.size + n]))


# ----------------------------------------------------------------------------------------------
# Which kind works on this node (decided once per run, by a tiny probe segment)

PROBE_BYTES = 4096


class Probe(NamedTuple):
    segment: Segment | None
    locator: tuple


def probe_create(kind: str) -> Probe:
    """Receiver side of the probe: a one-page segment holding a random token."""
    try:
        seg = Segment(kind, PROBE_BYTES)
    except OSError as exc:
        return Probe(None, ("error", f"{kind}: {exc}"))
    try:
        tok = secrets.token_bytes(16)
        seg.write(0, tok)
        return Probe(seg, seg.locator() + (tok,))
    except OSError as exc:
        seg.release()
        return Probe(None, ("error", f"{kind}: {exc}"))


def probe_check(loc: tuple) -> str | None:
    """Other ranks' side: None if the probe segment maps and reads back, else why not."""
    if loc[0] == "error":
        return loc[1]
    try:
        m = open_located(loc[:-1], "read")
    except (OSError, ValueError) as exc:
        return f"{loc[0]}: {exc}"
    try:
        return None if m[:16] == loc[-1] else f"{loc[0]}: the probe read back wrong bytes"
    finally:
        m.close()


def leftovers(uid: int | None = None) -> list[str]:
    """Names mpimap's file segments of this user left in /dev/shm (tests, diagnostics)."""
    uid = os.getuid() if uid is None else uid
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(f"{PREFIX}{uid}-"))
