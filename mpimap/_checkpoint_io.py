"""Checkpoint files: results stream to disk as they arrive; a rerun computes only what is missing.

The only module that imports h5py, on first use; ``_checkpoint`` is its light front (the
``checkpoint=`` argument, ``MISSING``, stop signals).

Files, for ``checkpoint="run.h5"`` (all in run.h5's folder):

    run.h5             the results, a plain HDF5 file (layout below). Never written in place: each
                       new version is built as run.h5.tmp-RUN, fsynced and renamed over it, so
                       run.h5 is always a complete file, from the last clean end of a run.
    run.h5.journal     an append-only log of the running map's results. Left behind only by a run
                       that was killed (kill -9, out of memory, node failure, SIGKILL after the
                       grace): the next run folds it into run.h5 before it starts.
    run.h5.tmp-RUN     the working copy of run RUN (run.h5 + its new rows); after a kill, the
                       place the journal's references to big array rows point into.
    run.h5.lock        held (flock) while a run has the checkpoint open.

Data flow on rank 0 (the workers never see the checkpoint):

    open   lock ─▶ a killed run's journal (+ the rows it points at) folded into run.h5
           ─▶ identity of func/common/seed and of every finished item: the same, or CheckpointError
           ─▶ run.h5 ─copy─▶ run.h5.tmp-RUN; a new journal
    run    ItemSource ─▶ _Source: runs of finished items are read back and handed to the map as
           ready chunks (input order kept); only runs of missing items go to workers
           numbers/strings ─queue─▶ journal thread: one record per MPIMAP_CHECKPOINT_FLUSH s
                            └──────▶ rows of run.h5.tmp-RUN, stored in batches
           big arrays (rows >= 256 KiB) ─▶ written once, as rows of run.h5.tmp-RUN; the journal
                                        records where, once that file is fsynced
           anything else (small arrays, failures, pickled results) ─▶ journal + rows at once
    close  run.h5.tmp-RUN: masks + attributes, close, fsync ─▶ rename over run.h5 ─▶ journal gone

Why a journal next to the HDF5 file. HDF5 keeps metadata (B-trees, heaps, the superblock's end of
file) in memory and writes it at flush and close; a process killed in between leaves a file HDF5
cannot open (tried: "bad object header version number"), and no flush discipline rules that out
(SWMR narrows it, but cannot add a dataset once it has started, which a late "this result does not
fit the native layout" needs). So the HDF5 file is only ever produced whole (temp file, fsync,
rename) and durability comes from the journal, whose records check themselves: a record counts
only if its length and its CRC32 (over header, metadata and data) are right, so a torn tail -- a
kill inside write(), blocks lost by a power cut -- is cut at the last good record. The raw bytes of
a chunk written with ``write_direct_chunk`` are at a fixed offset of the file at once (checked:
readable by offset before any flush, and after a kill), so a big array row is written only once,
into the working copy, and the journal holds (offset, size) instead of the bytes: no data is
written twice and the journal stays small. A damaged run.h5 (a copy cut short, a disk error) is
moved aside as run.h5.corrupt-TIME, what the journal holds is kept, and the run goes on.

What a kill loses: results that reached rank 0 are handed to the OS (they survive a kill -9 of the
job) and fsynced (they survive a crash of the node) at least every MPIMAP_CHECKPOINT_FLUSH seconds
(default 1; 0: each result is journaled as it arrives). Records that point at rows are written
only after the working copy is fsynced, so a record on disk never points at bytes that are not.
Tasks running at the moment of the kill are computed again by the next run.

Layout of run.h5, readable with h5py alone (N = number of items):

    /done            (N,) bool     True where the item's result is stored
    /failed          (N,) bool     True where the item raised (errors="return"); see /errors
    /result          (N, ...)      native results: numbers or numpy arrays of one shape and dtype;
    /result/<field>  (N, ...)      or one dataset per position of a tuple ("0", "1"...) / dict key
    /result_pickled  (N,) vlen u1  pickle of each result that does not fit the native layout
    /result_codec    (N,) u1       0: native (or none), 1: pickle, 2: dill (classes from a script)
    /item_digest     (N, 16) u1    identity of each item's input (see _identity)
    /errors/{index,type,message,traceback,codec,pickled}   one row per failed item
    attributes: mpimap_checkpoint (format), total, identity, layout, runs, versions (JSON)

The first result that fits a native layout fixes it (``float`` -> float64, ``int`` -> int64,
``bool``, ``complex``; numpy scalars and arrays keep dtype and shape); a later result that does not
fit (another shape, None, a string) goes to the pickled column, so storage never fails a map.
Float datasets hold NaN where there is no result. ``load`` gives back the Python types stored.
"""

from __future__ import annotations

import collections
import datetime
import errno
import io
import json
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib

import numpy as np

from . import _identity, _serial
from ._checkpoint import _STOP, MISSING, Checkpoint, _Catcher, _side, _stop_exception
from ._env import knob
from ._errors import CheckpointError, RemoteError

__all__ = ["MapCheckpoint", "info", "load", "open_map"]

FORMAT = 1
_MAGIC = b"MPJ1"
_HDR = struct.Struct("<4sIQI")  # magic, meta length, body length, crc32
_BIG = 64 << 10                 # a record with this much data is written at once, not buffered
_BUFFER_MAX = 4 << 20           # buffered journal bytes written without waiting for the timer
_EMIT_MAX = 4096                # finished items handed back per ready chunk
_CODEC_NONE, _CODEC_PICKLE, _CODEC_DILL = 0, 1, 2
_IMMUTABLE = frozenset((float, int, bool, complex, str, bytes, type(None)))


# ----------------------------------------------------------------------------------------------
# Versions and time

def _versions() -> dict:
    import platform

    import dill

    from . import __version__

    v = {"mpimap": __version__, "python": platform.python_version(), "dill": dill.__version__,
         "numpy": np.__version__}
    h5py = sys.modules.get("h5py")
    if h5py is not None:
        v["h5py"] = h5py.version.version
        v["hdf5"] = h5py.version.hdf5_version
    return v


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _fmt_versions(v: dict) -> str:
    names = (("mpimap", "mpimap"), ("python", "Python"), ("dill", "dill"), ("numpy", "numpy"),
             ("h5py", "h5py"), ("hdf5", "HDF5"))
    return ", ".join(f"{label} {v[k]}" for k, label in names if v.get(k))


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a dependency
        raise CheckpointError(f"checkpoints need h5py ({exc}); pip install h5py") from exc
    return h5py


# ----------------------------------------------------------------------------------------------
# Pickles kept in the file (one item at a time, self-contained: no out-of-band buffers)

def _pickle_inband(obj):
    """(codec, bytes) or None. Plain pickle when it is self-contained; dill (by value) when the
    stream names the script's __main__, so another process can still read it."""
    try:
        data = pickle.dumps(obj, protocol=5)
        if b"__main__" not in data:
            return _CODEC_PICKLE, data
    except Exception:
        pass
    try:
        out = io.BytesIO()
        _serial._DillPickler(out, protocol=5, byref=False, recurse=True).dump(obj)
        return _CODEC_DILL, out.getvalue()
    except Exception:
        return None


def _unpickle(codec, data):
    if codec == _CODEC_PICKLE:
        return pickle.loads(data)
    return _serial._Unpickler(io.BytesIO(data)).load()


def _rebuild_exception(tname, text, tb, codec, data) -> BaseException:
    """A recorded failure as an exception: the pickled one when it loads, else a RemoteError
    carrying its type name, message and traceback."""
    exc = None
    if codec != _CODEC_NONE and data:
        try:
            exc = _unpickle(codec, data)
        except Exception:
            exc = None
    return exc if isinstance(exc, BaseException) else RemoteError(tname, text, tb)


# ----------------------------------------------------------------------------------------------
# The journal

def _pack_record(meta: dict, segments) -> list:
    m = pickle.dumps(meta, protocol=5)
    body = len(m) + sum(memoryview(s).nbytes for s in segments)
    crc = zlib.crc32(struct.pack("<IQ", len(m), body))
    crc = zlib.crc32(m, crc)
    for s in segments:
        crc = zlib.crc32(s, crc)
    return [_HDR.pack(_MAGIC, len(m), body, crc), m, *segments]


def _read_records(path):
    """Valid records of a journal: [(meta, segments, end offset)] up to the first bad one."""
    out = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return out, 0, 0
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos + _HDR.size <= size:
            head = os.pread(fd, _HDR.size, pos)
            magic, mlen, body, crc = _HDR.unpack(head)
            if magic != _MAGIC or mlen > body or pos + _HDR.size + body > size:
                break
            data = os.pread(fd, body, pos + _HDR.size)
            if len(data) != body:
                break
            check = zlib.crc32(struct.pack("<IQ", mlen, body))
            if zlib.crc32(data, check) != crc:
                break
            view = memoryview(data)
            try:
                meta = pickle.loads(view[:mlen])
            except Exception:
                break
            segs = []
            off = mlen
            for n in meta.get("lens", ()):
                segs.append(view[off:off + n])
                off += n
            pos += _HDR.size + body
            out.append((meta, segs, pos))
        return out, pos, size
    finally:
        os.close(fd)


class _Journal:
    """A new journal: records are appended; a background thread writes the buffered ones and
    fsyncs every ``interval`` seconds (0: records are written at once, fsynced every 0.1 s).

    Records that point at rows of run.h5.tmp-RUN (``after_sync``) are written only after that
    file was fsynced, so a record on disk never points at bytes that are not: after a power cut
    a record is either absent or right.
    """

    def __init__(self, path, interval: float, tmp_fd: int, producer=None):
        self.path = path
        self.producer = producer  # called first in each cycle: turns queued results into records
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.interval = interval
        self.tmp_fd = tmp_fd
        self.pending: list = []
        self.pending_bytes = 0
        self.deferred: list = []
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mpimap-checkpoint-flush",
                                        daemon=True)
        self._thread.start()

    def append(self, meta: dict, segments=(), after_sync: bool = False) -> None:
        if self.error is not None:
            raise CheckpointError(f"cannot write {self.path}: {self.error}") from self.error
        parts = _pack_record(meta, segments)
        big = sum(memoryview(s).nbytes for s in segments) >= _BIG
        with self.lock:
            if after_sync:
                self.deferred.extend(_owned(p) for p in parts)
            elif big or self.interval == 0:
                # Arrays go out now, not buffered: the caller hands them to the user next.
                self.pending.extend(parts)
                self._write_locked()
            else:
                for p in parts:
                    p = _owned(p)
                    self.pending.append(p)
                    self.pending_bytes += len(p)
                if self.pending_bytes >= _BUFFER_MAX:
                    self._write_locked()

    def _write_locked(self):
        views = [memoryview(p).cast("B") for p in self.pending]
        self.pending, self.pending_bytes = [], 0
        while views:
            batch = views[:512]
            n = os.writev(self.fd, batch)
            while n:  # a short write: go on from where it stopped
                if n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                else:
                    views[0] = views[0][n:]
                    n = 0

    def _cycle(self):
        if self.producer is not None:
            self.producer()
        with self.lock:
            deferred, self.deferred = self.deferred, []
        if deferred:
            os.fsync(self.tmp_fd)  # the rows these records point at, first
        with self.lock:
            self.pending.extend(deferred)
            self._write_locked()
        os.fsync(self.fd)

    def _loop(self):
        wait = self.interval if self.interval > 0 else 0.1
        while not self._stop.wait(wait):
            try:
                self._cycle()
            except BaseException as exc:  # reported by the next append
                self.error = exc
                return

    def close(self) -> None:
        """Write and fsync everything; raises CheckpointError if a write failed."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        self._thread.join()
        try:
            if self.error is None:
                self._cycle()
        finally:
            os.close(self.fd)
        if self.error is not None:
            raise CheckpointError(f"cannot write {self.path}: {self.error}") from self.error


def _owned(part):
    return part if isinstance(part, bytes) else bytes(part)


# ----------------------------------------------------------------------------------------------
# Results that point at rows of run.h5.tmp-RUN instead of holding their bytes

class _RefPickler(pickle.Pickler):
    """Pickles results, writing an array already stored as a row of run.h5.tmp-RUN as a
    reference (run, offset, nbytes, dtype, shape): big arrays are written once, not twice."""

    def __init__(self, file, refs: dict, run_id: str):
        super().__init__(file, protocol=5)
        self.refs = refs
        self.run_id = run_id

    def persistent_id(self, obj):
        if type(obj) is np.ndarray:
            ref = self.refs.get(id(obj))
            if ref is not None and ref[0] is obj:
                return ("raw", self.run_id, ref[1], ref[2], obj.dtype.str, obj.shape)
        return None


class _DillRefPickler(_serial._DillPickler):
    persistent_id = _RefPickler.persistent_id


def _dumps_refs(values, refs, run_id):
    """(codec, bytes) of ``values`` with array references; dill when __main__ appears."""
    out = io.BytesIO()
    try:
        p = _RefPickler(out, refs, run_id)
        p.dump(values)
        data = out.getvalue()
        if b"__main__" not in data:
            return _serial.CODEC_PICKLE, data
    except Exception:
        pass
    out = io.BytesIO()
    p = _DillRefPickler(out, protocol=5, byref=False, recurse=True)
    p.refs, p.run_id = refs, run_id
    p.dump(values)
    return _serial.CODEC_DILL, out.getvalue()


class _RawRows:
    """Reads the rows that references point at, from run.h5.tmp-RUN files (torn or not).
    ``dry``: only checks that they are there (``checkpoint info`` reads no data)."""

    def __init__(self, path, dry=False):
        self.path = path
        self.dry = dry
        self.fds: dict = {}

    def read(self, run_id, offset, nbytes, dtype, shape):
        fd = self.fds.get(run_id)
        if fd is None:
            try:
                fd = self.fds[run_id] = os.open(_tmp_name(self.path, run_id), os.O_RDONLY)
            except OSError:
                raise _RowsLost(run_id) from None
        if self.dry:
            if os.fstat(fd).st_size < offset + nbytes:
                raise _RowsLost(run_id)
            return np.empty(shape, dtype)  # untouched pages: costs no memory
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise _RowsLost(run_id)
        return np.frombuffer(bytearray(data), dtype).reshape(shape)

    def close(self):
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _RowsLost(Exception):
    """A reference points into a run.h5.tmp-RUN file that is gone or too short."""


def _ref_unpickler(codec, data, rows: _RawRows):
    base = pickle.Unpickler if codec == _serial.CODEC_PICKLE else _serial._Unpickler

    class Unpickler(base):
        def persistent_load(self, pid):
            if pid[0] != "raw":
                raise pickle.UnpicklingError(f"unknown reference {pid[0]!r}")
            return rows.read(*pid[1:])

    return Unpickler(io.BytesIO(data))


def _tmp_name(path, run_id) -> str:
    return f"{path}.tmp-{run_id}"


# ----------------------------------------------------------------------------------------------
# Native layout: which results become HDF5 datasets

_NATIVE_MAX_ROW = 1 << 30


def _leaf(v):
    """(kind, dtype str, shape) of a value that has a native dataset column, else None."""
    t = type(v)
    if t is float:
        return ("float", "<f8", ())
    if t is int:
        return ("int", "<i8", ()) if -(1 << 63) <= v < (1 << 63) else None
    if t is bool:
        return ("bool", "|b1", ())
    if t is complex:
        return ("complex", "<c16", ())
    if t is np.ndarray:
        dt = v.dtype
        if dt.kind in "biufc" and dt.fields is None and v.nbytes <= _NATIVE_MAX_ROW and \
                dt.byteorder != ">":
            return ("ndarray", dt.str, tuple(v.shape))
        return None
    if isinstance(v, np.generic) and v.dtype.kind in "biufc" and v.dtype.byteorder != ">":
        return ("npscalar", v.dtype.str, ())
    return None


def _valid_field(k) -> bool:
    return isinstance(k, str) and k not in ("", ".") and "/" not in k and len(k) < 256


def _signature(value):
    """(kind, ((field, leaf), ...)) of a result that can be stored natively, else None."""
    t = type(value)
    if t is tuple:
        if not 1 <= len(value) <= 64:
            return None
        leaves = tuple(_leaf(x) for x in value)
        if any(x is None for x in leaves):
            return None
        return ("tuple", tuple((str(i), lf) for i, lf in enumerate(leaves)))
    if t is dict:
        if not 1 <= len(value) <= 64 or not all(_valid_field(k) for k in value):
            return None
        leaves = tuple((k, _leaf(x)) for k, x in value.items())
        if any(lf is None for _k, lf in leaves):
            return None
        return ("dict", leaves)
    lf = _leaf(value)
    return None if lf is None else ("value", (("", lf),))


def _fits(sig, layout) -> bool:
    if sig is None or sig[0] != layout["kind"]:
        return False
    if sig[0] == "dict":
        return dict(sig[1]) == layout["_by_name"]
    return sig[1] == layout["_fields"]


def _layout_from_sig(sig) -> dict:
    fields = [{"name": name, "kind": lf[0], "dtype": lf[1], "shape": list(lf[2])}
              for name, lf in sig[1]]
    return _finish_layout({"kind": sig[0], "fields": fields})


def _finish_layout(layout: dict) -> dict:
    fl = tuple((f["name"], (f["kind"], f["dtype"], tuple(f["shape"]))) for f in layout["fields"])
    layout["_fields"] = fl
    layout["_by_name"] = dict(fl)
    return layout


def _public_layout(layout):
    return None if layout is None else {"kind": layout["kind"], "fields": layout["fields"]}


def _dataset_name(layout, field) -> str:
    return "result" if layout["kind"] == "value" else f"result/{field['name']}"


def _rows_to_values(kind, block, n):
    if kind in ("float", "int", "bool", "complex"):
        return block.tolist()
    if kind == "npscalar":
        return [block[i] for i in range(n)]
    return [block[i, ...] for i in range(n)]


# ----------------------------------------------------------------------------------------------
# The state of a checkpoint, in memory

class _State:
    """Masks, identity and bookkeeping of one checkpoint (the HDF5 file holds the values)."""

    def __init__(self, capacity=0):
        self.identity: dict | None = None
        self.total: int | None = None
        self.layout: dict | None = None
        self.runs: list = []
        self.versions: dict = {}
        self.generation: str | None = None
        self.folded_journal: str | None = None
        self.errors: dict = {}  # index -> (type, message, traceback, codec, pickled bytes)
        self.size = 0  # highest index with anything recorded + 1
        self.done = np.zeros(capacity, bool)
        self.failed = np.zeros(capacity, bool)
        self.codec = np.zeros(capacity, np.uint8)
        self.digests = np.zeros((capacity, 16), np.uint8)

    def grow(self, n):
        cap = len(self.done)
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)
        for name in ("done", "failed", "codec"):
            old = getattr(self, name)
            arr = np.zeros(new, old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)
        d = np.zeros((new, 16), np.uint8)
        d[:cap] = self.digests
        self.digests = d

    @property
    def ndone(self) -> int:
        return int(np.count_nonzero(self.done[:self.extent]))

    @property
    def nfailed(self) -> int:
        return int(np.count_nonzero(self.failed[:self.extent]))

    @property
    def extent(self) -> int:
        return self.total if self.total is not None else self.size

    def skip_mask(self, retry_failed: bool):
        return self.done if retry_failed else (self.done | self.failed)


def _read_state(f) -> _State:
    """State of an open run.h5 / run.h5.tmp (h5py File)."""
    fmt = f.attrs.get("mpimap_checkpoint")
    if fmt is None:
        raise CheckpointError("it is not an mpimap checkpoint (no mpimap_checkpoint attribute)")
    if int(fmt) > FORMAT:
        raise CheckpointError(f"it was written in checkpoint format {int(fmt)} by a newer "
                              f"mpimap ({json.loads(f.attrs.get('versions', '{}')).get('mpimap')})"
                              f"; this mpimap reads format {FORMAT}. Upgrade mpimap.")
    st = _State()
    st.identity = json.loads(f.attrs["identity"])
    total = int(f.attrs["total"])
    st.total = None if total < 0 else total
    layout = json.loads(f.attrs.get("layout", "null"))
    st.layout = None if layout is None else _finish_layout(layout)
    st.runs = json.loads(f.attrs.get("runs", "[]"))
    st.versions = json.loads(f.attrs.get("versions", "{}"))
    st.generation = f.attrs.get("generation")
    st.folded_journal = f.attrs.get("folded_journal") or None
    n = f["done"].shape[0]
    st.grow(n)
    st.size = n
    st.done[:n] = f["done"][:]
    st.failed[:n] = f["failed"][:]
    st.codec[:n] = f["result_codec"][:]
    st.digests[:n] = f["item_digest"][:]
    if "errors" in f:
        g = f["errors"]
        idx = g["index"][:]
        types = g["type"].asstr()[:]
        msgs = g["message"].asstr()[:]
        tbs = g["traceback"].asstr()[:]
        codecs = g["codec"][:]
        pickles = g["pickled"][:]
        for k, i in enumerate(idx.tolist()):
            st.errors[i] = (types[k], msgs[k], tbs[k], int(codecs[k]), bytes(pickles[k]))
    return st


# ----------------------------------------------------------------------------------------------
# The HDF5 file being built (run.h5.tmp) or read (run.h5)

class _Store:
    """Rows of the HDF5 file being built (run.h5.tmp), or read (run.h5); ``f=None``: the state
    alone (``checkpoint info``).

    run.h5.tmp only has to be right when it is closed (the journal is what survives a crash), so
    rows are buffered and written in few large calls: h5py costs ~0.1 ms per call, more than the
    whole bookkeeping of a small result. Arrays are copied into the buffer, or written at once
    when big, because the caller hands the same arrays to the user.
    """

    _BUFFER = 8 << 20  # buffered row bytes that trigger a write
    _NOW = 1 << 20     # a run of native rows this big is written at once (no copy)

    def __init__(self, f, state: _State, path: str):
        self.f = f
        self.st = state
        self.path = path  # the checkpoint's name, for messages
        self.ds: dict = {}
        self.pending_native: list = []  # (start, [values])
        self.pending_pickled: list = []  # (index, bytes)
        self.pending_bytes = 0

    # -- datasets --------------------------------------------------------------------------------

    def _get(self, name):
        ds = self.ds.get(name)
        if ds is None:
            ds = self.ds[name] = self.f[name]
        return ds

    def _row_datasets(self):
        names = []
        if self.st.layout is not None:
            names += [_dataset_name(self.st.layout, fd) for fd in self.st.layout["fields"]]
        if "result_pickled" in self.ds or (self.f is not None and "result_pickled" in self.f):
            names.append("result_pickled")
        return names

    def _rows_needed(self, stop):
        """Grow the row datasets so that rows [0, stop) exist (doubling: few resizes)."""
        total = self.st.total
        for name in self._row_datasets():
            ds = self._get(name)
            if ds.shape[0] < stop:
                target = max(stop, 2 * ds.shape[0])
                if total is not None and stop <= total:
                    target = min(target, total)
                ds.resize(target, axis=0)

    def _initial_rows(self):
        st = self.st
        return max(st.total if st.total is not None else 1024, st.size)

    def _create_layout(self, sig):
        st = self.st
        st.layout = _layout_from_sig(sig)
        if self.f is None:
            return
        rows = self._initial_rows()
        if st.layout["kind"] != "value":
            self.f.require_group("result")
        for fd in st.layout["fields"]:
            dt = np.dtype(fd["dtype"])
            shape = tuple(fd["shape"])
            row_bytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            per_chunk = int(max(1, min(65536, (256 << 10) // max(row_bytes, 1))))
            fill = np.array(complex(np.nan, np.nan) if dt.kind == "c" else np.nan,
                            dt)[()] if dt.kind in "fc" else None
            self.f.create_dataset(_dataset_name(st.layout, fd), shape=(rows, *shape),
                                  maxshape=(None, *shape), dtype=dt,
                                  chunks=(per_chunk, *shape) if shape else (per_chunk,),
                                  fillvalue=fill)

    def _pickled_ds(self):
        if "result_pickled" not in self.f:
            h5py = _h5py()
            self.f.create_dataset("result_pickled", shape=(self._initial_rows(),),
                                  maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8),
                                  chunks=(1024,))
        return self._get("result_pickled")

    # -- writing ---------------------------------------------------------------------------------

    def write(self, start, values, failures=None, digests=None) -> tuple[list, dict]:
        """Store the results of items start.. (exceptions at ``failures`` offsets: {offset:
        (type, message, traceback)}). Returns (offsets that could not be stored, {id(array):
        (array, file offset, nbytes)} of arrays written as rows of the file just now)."""
        st = self.st
        n = len(values)
        stop = start + n
        st.grow(stop)
        failures = failures or {}
        dry = self.f is None
        runs: list = []  # [a, b) of native results
        pickled, unstored = [], []
        for off, v in enumerate(values):
            if off in failures:
                continue
            sig = _signature(v)
            if st.layout is None and sig is not None:
                self._create_layout(sig)
            i = start + off
            if st.layout is not None and _fits(sig, st.layout):
                if runs and runs[-1][1] == off:
                    runs[-1][1] = off + 1
                else:
                    runs.append([off, off + 1])
                st.codec[i] = _CODEC_NONE
            elif dry:
                st.codec[i] = _CODEC_PICKLE
                pickled.append(off)
            else:
                packed = _pickle_inband(v)
                if packed is None:
                    unstored.append(off)
                    continue
                st.codec[i] = packed[0]
                pickled.append(off)
                self.pending_pickled.append((i, packed[1]))
                self.pending_bytes += len(packed[1])
            st.done[i] = True
            if st.failed[i]:
                st.failed[i] = False
                st.errors.pop(i, None)
        refs: dict = {}
        for a, b in runs:
            st.done[start + a:start + b] = True
            if not dry:
                self._buffer_native(start + a, values[a:b], refs)
        for off, (tname, text, tb) in failures.items():
            i = start + off
            packed = None if dry else _pickle_inband(values[off])
            codec, data = packed if packed is not None else (_CODEC_NONE, b"")
            st.errors[i] = (tname, text, tb, codec, data)
            st.failed[i] = True
            st.done[i] = False
        if digests is not None:
            st.digests[start:stop] = np.frombuffer(digests, np.uint8).reshape(n, 16)
        st.size = max(st.size, stop)
        if self.pending_bytes >= self._BUFFER:
            self.flush()
        return unstored, refs

    def _buffer_native(self, start, values, refs):
        fields = self.st.layout["fields"]
        if not any(fd["kind"] == "ndarray" for fd in fields):
            self.pending_native.append((start, values))  # numbers: immutable
            self.pending_bytes += 16 * len(values)
            return
        if any(self._one_row_chunks(fd) for fd in fields):
            # Big rows: written now, once; the journal records where they are.
            self._rows_needed(start + len(values))
            self._write_native(start, values, refs)
            return
        self.pending_native.append((start, [_copy_arrays(v) for v in values]))
        self.pending_bytes += sum(_nbytes(v) for v in values)

    def _one_row_chunks(self, fd) -> bool:
        return fd["kind"] == "ndarray" and bool(fd["shape"]) and \
            self._get(_dataset_name(self.st.layout, fd)).chunks[0] == 1

    def flush(self):
        """Write the buffered rows, merged into contiguous runs."""
        if self.f is None or not (self.pending_native or self.pending_pickled):
            return
        native = sorted(self.pending_native, key=lambda e: e[0])
        pickled = sorted(self.pending_pickled)
        self.pending_native, self.pending_pickled, self.pending_bytes = [], [], 0
        stop = max([s + len(v) for s, v in native] + [i + 1 for i, _d in pickled] + [0])
        if pickled:
            self._pickled_ds()
        self._rows_needed(stop)
        run_start, run = None, []
        for s, vals in native:
            if run_start is not None and run_start + len(run) == s:
                run.extend(vals)
                continue
            if run:
                self._write_native(run_start, run)
            run_start, run = s, list(vals)
        if run:
            self._write_native(run_start, run)
        if pickled:
            ds = self._get("result_pickled")
            k = 0
            while k < len(pickled):
                j = k + 1
                while j < len(pickled) and pickled[j][0] == pickled[j - 1][0] + 1:
                    j += 1
                _write_vlen(ds, pickled[k][0], [data for _i, data in pickled[k:j]])
                k = j

    def _write_native(self, start, items, refs=None):
        layout = self.st.layout
        for fd in layout["fields"]:
            ds = self._get(_dataset_name(layout, fd))
            if layout["kind"] == "value":
                column = items
            elif layout["kind"] == "tuple":
                k = int(fd["name"])
                column = [v[k] for v in items]
            else:
                column = [v[fd["name"]] for v in items]
            dt = ds.dtype
            if fd["kind"] == "ndarray":
                if ds.chunks[0] == 1 and fd["shape"]:
                    # one row per chunk: each row straight to the file, past the chunk cache
                    zeros = (0,) * len(fd["shape"])
                    for k, row in enumerate(column):
                        data = row if row.flags.c_contiguous else np.ascontiguousarray(row)
                        where = (start + k,) + zeros
                        ds.id.write_direct_chunk(where, data)
                        if refs is not None:
                            info = ds.id.get_chunk_info_by_coord(where)
                            refs[id(row)] = (row, info.byte_offset, info.size)
                    continue
                block = np.stack(column)
            else:
                block = np.array(column, dtype=dt)
            ds[start:start + len(items)] = block

    # -- reading ---------------------------------------------------------------------------------

    def read(self, start, stop, retry_failed=True) -> tuple[list, list]:
        """Values of items start..stop-1 (each done, or failed and final); (values, failed
        offsets). Missing items are MISSING."""
        self.flush()
        st = self.st
        n = stop - start
        out: list = [MISSING] * n
        failed_offsets = []
        done = st.done[start:stop]
        codec = st.codec[start:stop]
        native = done & (codec == _CODEC_NONE)
        layout = st.layout
        if native.any() and layout is not None:
            idx = np.flatnonzero(native)
            a, b = int(idx[0]), int(idx[-1]) + 1
            columns = []
            for fd in layout["fields"]:
                ds = self._get(_dataset_name(layout, fd))
                block = ds[start + a:start + b] if ds.shape[0] >= start + b else \
                    _padded(ds, start + a, start + b)
                columns.append(_rows_to_values(fd["kind"], block, b - a))
            for off in idx.tolist():
                k = off - a
                if layout["kind"] == "value":
                    out[off] = columns[0][k]
                elif layout["kind"] == "tuple":
                    out[off] = tuple(col[k] for col in columns)
                else:
                    out[off] = {fd["name"]: col[k] for fd, col in zip(layout["fields"], columns)}
        pick = np.flatnonzero(done & (codec != _CODEC_NONE))
        if len(pick):
            ds = self._get("result_pickled")
            for off in pick.tolist():
                i = start + off
                out[off] = self._unpickle_item(i, int(codec[off]), ds[i].tobytes())
        if not retry_failed:
            for off in np.flatnonzero(st.failed[start:stop]).tolist():
                out[off] = self.exception(start + off)
                failed_offsets.append(off)
        return out, failed_offsets

    def _unpickle_item(self, i, codec, data):
        try:
            return _unpickle(codec, data)
        except Exception as exc:
            raise CheckpointError(
                f"the result of item {i} in {self.path} is stored pickled and cannot be read "
                f"back here: {type(exc).__name__}: {exc}. It was written with "
                f"{_fmt_versions(self.st.versions) or 'unknown versions'}; this is "
                f"{_fmt_versions(_versions())}. Fix: make the module that defines its type "
                f"importable (same environment as the run that wrote it), or delete the "
                f"checkpoint to compute the results again.") from exc

    def exception(self, i):
        return _rebuild_exception(*self.st.errors[i])

    # -- the end -----------------------------------------------------------------------------

    def finalize(self, generation, journal_id):
        """Write masks, errors and attributes; rows beyond the total are cut."""
        h5py = _h5py()
        self.flush()
        st = self.st
        n = st.extent
        st.grow(n)
        for name in self._row_datasets():
            if self._get(name).shape[0] != n:
                self._get(name).resize(n, axis=0)
        _put(self.f, "done", st.done[:n])
        _put(self.f, "failed", st.failed[:n])
        _put(self.f, "result_codec", st.codec[:n])
        _put(self.f, "item_digest", st.digests[:n])
        if "errors" in self.f:
            del self.f["errors"]
        errs = sorted(i for i in st.errors if i < n)
        g = self.f.create_group("errors")
        g.create_dataset("index", data=np.array(errs, np.int64))
        sdt = h5py.string_dtype()
        for k, name in enumerate(("type", "message", "traceback")):
            g.create_dataset(name, data=np.array([st.errors[i][k] for i in errs] or [],
                                                 dtype=object), dtype=sdt)
        g.create_dataset("codec", data=np.array([st.errors[i][3] for i in errs], np.uint8))
        pk = g.create_dataset("pickled", shape=(len(errs),), dtype=h5py.vlen_dtype(np.uint8))
        _write_vlen(pk, 0, [st.errors[i][4] for i in errs])
        a = self.f.attrs
        a["mpimap_checkpoint"] = FORMAT
        a["total"] = -1 if st.total is None else st.total
        a["identity"] = json.dumps(st.identity)
        a["layout"] = json.dumps(_public_layout(st.layout))
        a["runs"] = json.dumps(st.runs)
        a["versions"] = json.dumps(_versions())
        a["generation"] = generation
        a["folded_journal"] = journal_id or ""
        a["done_count"] = st.ndone
        a["failed_count"] = st.nfailed


def _write_vlen(ds, start, blobs):
    """Rows of bytes into a vlen uint8 dataset. (h5py's ``ds[a:b] = objects`` stacks rows of
    equal length into a 2-D array and fails; write_direct takes them as they are.)"""
    if not blobs:
        return
    block = np.empty(len(blobs), dtype=ds.dtype)
    for k, data in enumerate(blobs):
        block[k] = np.frombuffer(data, np.uint8)
    ds.write_direct(block, dest_sel=np.s_[start:start + len(blobs)])


def _nbytes(v) -> int:
    if type(v) is np.ndarray:
        return v.nbytes
    if type(v) is tuple:
        return sum(_nbytes(x) for x in v)
    if type(v) is dict:
        return sum(_nbytes(x) for x in v.values())
    return 16


def _copy_arrays(v):
    if type(v) is np.ndarray:
        return v.copy()
    if type(v) is tuple:
        return tuple(_copy_arrays(x) for x in v)
    if type(v) is dict:
        return {k: _copy_arrays(x) for k, x in v.items()}
    return v


def _put(f, name, arr):
    if name in f and f[name].shape == arr.shape and f[name].dtype == arr.dtype:
        f[name][...] = arr
        return
    if name in f:
        del f[name]
    f.create_dataset(name, data=arr, chunks=True if arr.size else None,
                     maxshape=(None,) + arr.shape[1:] if arr.size else None)


def _padded(ds, a, b):
    block = np.full((b - a,) + ds.shape[1:], np.nan if ds.dtype.kind in "fc" else 0, ds.dtype)
    have = max(0, min(b, ds.shape[0]) - a)
    if have:
        block[:have] = ds[a:a + have]
    return block


def _new_file(path):
    h5py = _h5py()
    f = h5py.File(path, "w", libver=("earliest", "v110"), rdcc_nbytes=32 << 20,
                  rdcc_nslots=10007)
    return f


def _open_file(path, mode):
    h5py = _h5py()
    return h5py.File(path, mode, rdcc_nbytes=32 << 20, rdcc_nslots=10007)


# ----------------------------------------------------------------------------------------------
# Identity and its comparison

def _identity_of(func, common, has_common, seed, nargs, extra) -> dict:
    ident = {"function": _identity.function_identity(func),
             "common": _identity.digest(common).hex() if has_common else None,
             "seed": seed, "nargs": nargs, "pool": None}
    if extra:
        (pc, has_pc) = extra.get("pool_common", (None, False))
        init = extra.get("initializer", (None, ()))
        ident["pool"] = _identity.digest((pc if has_pc else None, has_pc, init)).hex()
    return ident


def _where(fn: dict) -> str:
    name = fn.get("name") or "?"
    if fn.get("file"):
        return f"`{name}` ({os.path.basename(fn['file'])}:{fn.get('line')})"
    return f"`{name}`"


def _differences(old: dict, new: dict) -> list:
    out = []
    fo, fn = old["function"], new["function"]
    if fo["digest"] != fn["digest"]:
        if fo.get("name") != fn.get("name"):
            out.append(f"the function: it was made by {_where(fo)}, this map runs {_where(fn)}")
        else:
            moved = f" (it was at line {fo.get('line')})" if fo.get("line") != fn.get("line") \
                else ""
            out.append(f"the function {_where(fn)}{moved}: its code, or a value it reads (a "
                       f"global, a closure variable, a default argument, a helper it calls), "
                       f"has changed")
    if old.get("common") != new.get("common"):
        what = {(True, False): "it was made with common data, this map has none",
                (False, True): "it was made without common data, this map has some"}.get(
            (old.get("common") is not None, new.get("common") is not None),
            "the common data has changed")
        out.append(f"common: {what}")
    if old.get("pool") != new.get("pool"):
        out.append("the Pool's common data or initializer has changed")
    if old.get("seed") != new.get("seed"):
        out.append(f"seed: it was made with seed={old.get('seed')!r}, this map has "
                   f"seed={new.get('seed')!r}")
    if old.get("nargs") != new.get("nargs"):
        out.append(f"it was made for {old.get('nargs')} input iterable(s), this map has "
                   f"{new.get('nargs')}")
    return out


def _item_list(idx, limit=8) -> str:
    from ._driver import format_items

    idx = list(idx)
    head = format_items(idx[:limit])
    return head + (f" (and {len(idx) - limit} more)" if len(idx) > limit else "")


# ----------------------------------------------------------------------------------------------
# Lock

class _Lock:
    def __init__(self, path):
        import fcntl

        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    try:
                        owner = os.pread(fd, 512, 0).decode(errors="replace").strip()
                    finally:
                        os.close(fd)
                    raise CheckpointError(
                        f"{path[:-5]} is in use by another run ({owner or 'unknown owner'}); "
                        f"two runs cannot write one checkpoint. Wait for it to end, or give "
                        f"this map another checkpoint path.") from None
                if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOLCK):
                    break  # a file system without flock (Lustre without -o flock): no lock
                os.close(fd)
                raise
            # The file may have been removed by the previous holder between open and flock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode(), 0)

    def release(self):
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint without writing it (load, info, and the start of a run)

# ----------------------------------------------------------------------------------------------
# Journal records into a store

def _decode_results(meta, segs, path, versions, rows):
    """(values, {offset: (type, message, traceback)}) of a journal result record."""
    try:
        if meta.get("refs"):
            values = _ref_unpickler(meta["codec"], segs[0], rows).load()
        else:
            values = _serial.loads(meta["codec"], segs[0], segs[1:])
    except _RowsLost:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"results of items {meta['start']}..{meta['start'] + meta['n'] - 1} in "
            f"{_side(path, 'journal')} cannot be read back here: {type(exc).__name__}: {exc}. "
            f"They were written with {_fmt_versions(versions) or 'other versions'}; this is "
            f"{_fmt_versions(_versions())}. Fix: use the environment that wrote them (the "
            f"module that defines their type must be importable).") from exc
    failures = {}
    for off, tname, text, tb, codec, data in meta.get("fail", ()):
        values[off] = _rebuild_exception(tname, text, tb, codec, data)
        failures[off] = (tname, text, tb)
    return values, failures


def _apply(store: _Store, meta, segs, rows: _RawRows, notes: dict, values_out=None):
    """Fold one journal record into ``store`` (and its state). ``values_out``: a list that also
    gets the decoded results (``load``)."""
    st = store.st
    kind = meta.get("k")
    if kind == "batch":
        try:
            lists = _serial.loads(meta["codec"], segs[0], segs[1:])
        except Exception as exc:
            raise CheckpointError(f"a record of {_side(store.path, 'journal')} cannot be read "
                                  f"back: {type(exc).__name__}: {exc}") from exc
        for (start, n, digests), values in zip(meta["chunks"], lists):
            store.write(start, values, None, digests)
            notes["results"] = notes.get("results", 0) + n
            if values_out is not None:
                if len(values_out) < start + n:
                    values_out.extend([MISSING] * (start + n - len(values_out)))
                values_out[start:start + n] = values
    elif kind == "res":
        start, n = meta["start"], meta["n"]
        try:
            values, failures = _decode_results(meta, segs, store.path, st.versions, rows)
        except _RowsLost:
            notes["lost"] = notes.get("lost", 0) + n
            return
        unstored, _refs = store.write(start, values, failures, meta.get("digests"))
        gone = set(unstored) | set(meta.get("unstored", ()))
        for off in gone:
            st.done[start + off] = False
        notes["results"] = notes.get("results", 0) + n - len(gone)
        if values_out is not None:
            if len(values_out) < start + n:
                values_out.extend([MISSING] * (start + n - len(values_out)))
            for off, v in enumerate(values):
                values_out[start + off] = MISSING if off in gone else v
    elif kind == "total":
        st.total = meta["total"]
    elif kind == "identity":
        st.identity = meta["identity"]
        if meta.get("total", "keep") != "keep":
            st.total = meta["total"]
        for i in meta.get("undone", ()):
            if i < len(st.done):
                st.done[i] = st.failed[i] = False
                st.errors.pop(i, None)
            if values_out is not None and i < len(values_out):
                values_out[i] = MISSING
    elif kind == "run":
        st.runs.append(dict(meta["run"]))
    elif kind == "end":
        for run in st.runs:
            if run.get("id") == meta.get("run"):
                run.update(meta["how"])
    elif kind == "head":
        if st.identity is None:
            st.identity = meta["identity"]
        if st.total is None:
            st.total = meta.get("total")


def _has_results(records) -> bool:
    return any(m.get("k") in ("res", "batch", "identity", "total") for m, _s, _e in records)


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint without writing it (load, info, and the start of a run)

class _Snapshot:
    """run.h5 and the journal a killed run left next to it, read-only."""

    def __init__(self, path):
        self.path = path
        self.notes: dict = {"corrupt": None, "stale_journal": None, "torn_bytes": 0}
        self.base_error = None
        self.state = None
        self.journal_head = None
        records, end, size = _read_records(_side(path, "journal"))
        self.notes["torn_bytes"] = size - end
        gen = None
        if os.path.exists(path):
            try:
                with _open_file(path, "r") as f:
                    self.state = _read_state(f)
                gen = self.state.generation
            except Exception as exc:
                self.base_error = exc
                self.notes["corrupt"] = f"{type(exc).__name__}: {exc}"
        if records and records[0][0].get("k") != "head":
            records = []
        if records and self.base_error is None and records[0][0].get("base") != gen:
            # It extends another version of run.h5: folded into this one already (a crash
            # between the rename and its removal), or a file that was replaced.
            folded = self.state is not None and \
                self.state.folded_journal == records[0][0].get("journal")
            self.notes["stale_journal"] = "folded" if folded else "other"
            records = []
        self.records = records
        if records:
            self.journal_head = records[0][0]
        self.notes["journal_results"] = sum(
            m.get("n", 0) if m.get("k") == "res" else sum(c[1] for c in m.get("chunks", ()))
            for m, _s, _e in records)

    @property
    def exists(self) -> bool:
        return self.state is not None or bool(self.records)


def _snapshot_or_fail(path) -> _Snapshot:
    snap = _Snapshot(path)
    if not snap.exists:
        if snap.base_error is not None:
            raise CheckpointError(f"cannot read checkpoint {path}: {snap.notes['corrupt']}")
        raise CheckpointError(f"no checkpoint at {path}")
    return snap


def load(path, *, missing=MISSING) -> list:
    """See ``_checkpoint.load``."""
    path = os.path.abspath(os.fspath(path))
    snap = _snapshot_or_fail(path)
    values: list = []
    st = _State()
    if snap.state is not None:
        st = snap.state
        with _open_file(path, "r") as f:
            values = _Store(f, st, path).read(0, st.size, retry_failed=False)[0]
    store = _Store(None, st, path)  # the journal's records: the state here, values in `values`
    rows = _RawRows(path)
    try:
        for meta, segs, _end in snap.records:
            _apply(store, meta, segs, rows, {}, values)
    finally:
        rows.close()
    n = st.extent
    if len(values) < n:
        values.extend([MISSING] * (n - len(values)))
    del values[n:]
    if missing is not MISSING:
        values = [missing if v is MISSING else v for v in values]
    return values


def info(path) -> str:
    """What ``mpimap checkpoint info PATH`` prints."""
    path = os.path.abspath(os.fspath(path))
    snap = _snapshot_or_fail(path)
    lines = []
    st = snap.state if snap.state is not None else _State()
    store = _Store(None, st, path)
    rows = _RawRows(path, dry=True)
    notes: dict = {}
    for meta, segs, _end in snap.records:
        _apply(store, meta, segs, rows, notes)
    rows.close()
    ident = st.identity or {}
    total = st.total
    ndone, nfailed = st.ndone, st.nfailed
    if total is not None:
        missing = total - ndone - nfailed
        pct = f" ({100 * ndone / total:.1f}%)" if total else ""
        lines.append(f"{path}: {ndone:,} of {total:,} items done{pct}, {nfailed:,} failed, "
                     f"{missing:,} missing")
    else:
        lines.append(f"{path}: {ndone:,} items done, {nfailed:,} failed (the total is not "
                     f"known yet: the input was a generator that has not been read to its "
                     f"end)")
    fn = ident.get("function", {})
    lines.append(f"  function   {_where(fn)}, fingerprint {fn.get('digest', '?')[:16]}")
    extras = []
    if ident.get("common"):
        extras.append(f"common {ident['common'][:16]}")
    if ident.get("pool"):
        extras.append(f"pool {ident['pool'][:16]}")
    extras.append(f"seed {ident.get('seed')!r}")
    lines.append(f"  inputs     {ident.get('nargs', 1)} iterable(s); " + "; ".join(extras))
    layout = st.layout
    npickled = int(np.count_nonzero(st.done[:st.extent] &
                                    (st.codec[:st.extent] != _CODEC_NONE)))
    if layout is None:
        lay = "all results pickled" if ndone else "no results yet"
    else:
        parts = []
        for fd in layout["fields"]:
            shape = "x".join(map(str, fd["shape"]))
            name = _dataset_name(layout, fd)
            parts.append(f"/{name} {np.dtype(fd['dtype']).name}" + (f"[{shape}]" if shape
                                                                    else ""))
        lay = ", ".join(parts) + f"; {npickled:,} pickled in /result_pickled"
    lines.append(f"  layout     {lay}")
    if nfailed:
        by_type: dict = {}
        for i in sorted(i for i in st.errors if st.failed[i]):
            by_type.setdefault(st.errors[i][0], []).append(i)
        for tname, idx in sorted(by_type.items(), key=lambda kv: -len(kv[1])):
            first = st.errors[idx[0]][1]
            lines.append(f"  failures   {tname} x{len(idx)} (items {_item_list(idx)}): "
                         f"{first[:120]}")
    if snap.records:
        lines.append(f"  journal    {_side(path, 'journal')}: "
                     f"{snap.notes['journal_results']:,} results not yet in "
                     f"{os.path.basename(path)} (the next run folds them in)")
    if snap.notes["torn_bytes"]:
        lines.append(f"  journal    {snap.notes['torn_bytes']:,} bytes at its end are a torn "
                     f"record (a run was killed while writing it); they are ignored")
    if snap.notes["corrupt"]:
        lines.append(f"  damaged    {os.path.basename(path)} cannot be read "
                     f"({snap.notes['corrupt']}); the next run sets it aside and keeps "
                     f"what the journal holds")
    if snap.notes["stale_journal"] == "other":
        lines.append(f"  journal    {_side(path, 'journal')} belongs to another version of "
                     f"{os.path.basename(path)} and is ignored")
    for k, run in enumerate(st.runs, 1):
        how = run.get("how") or "killed (no clean end; its results were kept in the journal)"
        job = f" (Slurm job {run['slurm_job']})" if run.get("slurm_job") else ""
        lines.append(f"  run {k:<6} {run.get('started', '?')} on {run.get('host', '?')}{job}, "
                     f"{run.get('ranks', '?')} rank(s): {run.get('new', 0):,} new result(s); "
                     f"{how}")
        if run.get("versions"):
            lines.append(f"             {_fmt_versions(run['versions'])}")
    written = st.versions or (st.runs[-1].get("versions") if st.runs else None)
    if written:
        lines.append(f"  written by {_fmt_versions(written)}")
    return "\n".join(lines)



# ----------------------------------------------------------------------------------------------
# A checkpointed map

class _Source:
    """The map's input with finished items taken out.

    ``take(n)`` returns the next run of missing items (contiguous, so item indices, task() and
    rng() are unchanged); runs of finished items met on the way are handed to the session's
    ``on_done`` as ready results, in input order. Finished items read from an iterator are
    compared with their recorded inputs as they pass (a sequence is checked before any work).
    """

    def __init__(self, inner, session):
        self.inner = inner
        self.s = session
        self.nargs = inner.nargs
        self.length = inner.length
        self.hint = getattr(inner, "hint", None)
        self.taken = 0
        self.ended = False
        self.back: list = []  # items read from an iterator and pushed back
        self.check = inner.seqs is None
        self.skip_ahead = 0   # finished items at indices >= taken (sequences: for `remaining`)
        if self.length is not None:
            self.skip_ahead = int(np.count_nonzero(session.skip[:self.length]))

    @property
    def exhausted(self) -> bool:
        if self.ended:
            return True
        return self.length is not None and self.taken >= self.length

    @property
    def remaining(self):
        if self.length is not None:
            return max(0, self.length - self.taken - self.skip_ahead)
        return self.inner.remaining

    def _pull(self, k):
        got = []
        if self.back:
            got, self.back = self.back[:k], self.back[k:]
        if len(got) < k and not self.inner.exhausted:
            more = self.inner.take(k - len(got))
            if more is not None:
                got = list(got) + list(more) if got else more
        return got

    def _end(self):
        if not self.ended:
            self.ended = True
            self.s.input_ended(self.taken)
        return None

    def take(self, n):
        s = self.s
        if not s.any_skip:  # nothing finished to take out (a fresh map): straight through
            if self.exhausted or s.failure is not None:
                return None
            i = self.taken
            items = self._pull(n)
            if not len(items):
                return self._end()
            return self._hand_out(i, items)
        while not self.exhausted and s.failure is None:
            i = self.taken
            k = s.skippable_run(i, _EMIT_MAX)
            items = self._pull(k if k else s.pending_run(i, n))
            if not len(items):
                return self._end()
            if k:
                if self.check:
                    bad = s.check_items(i, items)
                    if bad is False:
                        return None  # the map fails with the mismatch
                    if bad is not None:  # mismatch="resume": recompute from offset `bad` on
                        self.back = list(items[bad:]) + self.back
                        items = items[:bad]
                        if not items:
                            continue
                got = len(items)
                self.taken += got
                if self.length is not None:
                    self.skip_ahead -= got
                if not s.emit_done(i, got):
                    return None
                continue
            return self._hand_out(i, items)
        return None

    def _hand_out(self, i, items):
        """Items from offset ``i`` go to workers: noted as taken (None if the map must stop)."""
        if not self.s.note_taken(i, items):
            return None
        self.taken += len(items)
        if self.length is None and self.inner.exhausted and not self.back:
            self._end()
        return items


class MapCheckpoint:
    """One map's checkpoint on rank 0: opened by ``open_map``, closed by ``close``.

    Opening first finishes what a killed run left (``_recover``: its journal folded into a new
    run.h5), so a run always starts from run.h5 alone, with a new journal.
    """

    def __init__(self, ck: Checkpoint, ident: dict, source, ranks: int):
        self.ck = ck
        self.path = ck.path
        self.ident = ident
        self.retry_failed = ck.retry_failed
        self.failure = None
        self.on_done = None   # (start, values, failed offsets) -> bool: go on
        self.on_error = None  # (exception) -> None; None: raise it
        self.journal = None
        self.store = None
        self.f = None
        self.tmp = None
        self._tmp_fd = None
        self.closed = False
        self.readonly = False
        self.identity_changed = False
        self.keep_files = False
        self.broken = False
        self.batching = knob("MPIMAP_CHECKPOINT_FLUSH") > 0
        self.defer_digests = ranks > 1   # serial: the task gets the item itself (may change it)
        self.taken: dict = {}            # chunk start -> items, until their results arrive
        self.queued: collections.deque = collections.deque()
        self.unstored: list = []
        self.unstored_n = 0
        self.any_skip = False
        self.new = 0
        self.unstored_warned = False
        self.grace = knob("MPIMAP_CHECKPOINT_GRACE")
        self.run_id = uuid.uuid4().hex[:16]
        self.catcher = _Catcher()
        self.lock = _Lock(_side(self.path, "lock"))
        try:
            self._open(source, ranks)
        except BaseException:
            self._abandon()
            raise

    # -- opening ---------------------------------------------------------------------------------

    def _open(self, source, ranks):
        path = self.path
        messages: list = []
        snap = self._recover(_Snapshot(path), messages)
        base = snap.state
        old_ident = base.identity if base is not None else None
        total_now = source.length
        undone: list = []
        if old_ident is not None:
            diffs = _differences(old_ident, self.ident)
            if total_now is not None and base.total is not None and total_now != base.total:
                diffs.append(f"the input has {total_now:,} items; the checkpoint was made for "
                             f"{base.total:,}")
            if source.seqs is not None:
                undone = self._changed_items(source, base)
                if undone:
                    diffs.append(f"the input of item(s) {_item_list(undone)} differs from the "
                                 f"one the finished result was computed from")
            if diffs:
                if self.ck.mismatch != "resume":
                    raise CheckpointError(self._mismatch_message(diffs, base.ndone))
                messages.append("resuming anyway (mismatch=\"resume\"), although " +
                                "; ".join(diffs) + ".")
        for msg in messages:
            print(f"mpimap: checkpoint {path}: {msg}", file=sys.stderr, flush=True)
        if base is not None and not undone and old_ident == self.ident and \
                self._read_only(base, source):
            return
        # The working copy: run.h5.tmp-RUN, renamed over run.h5 at the end.
        self.tmp = _tmp_name(path, self.run_id)
        if base is not None:
            import shutil

            shutil.copyfile(path, self.tmp)
            self.f = _open_file(self.tmp, "r+")
            state = base
        else:
            self.f = _new_file(self.tmp)
            state = _State()
        self.st = state
        self.store = _Store(self.f, state, path)
        for i in undone:
            state.done[i] = state.failed[i] = False
            state.errors.pop(i, None)
        self.old_total = state.total
        if total_now is not None:
            state.total = total_now
        state.identity = self.ident
        self.identity_changed = old_ident is not None and (
            bool(undone) or old_ident != self.ident or self.old_total != state.total)
        self.skip = state.skip_mask(self.retry_failed)
        self.any_skip = bool(self.skip.any())
        self._tmp_fd = os.open(self.tmp, os.O_RDONLY)
        self.journal = _Journal(_side(path, "journal"), knob("MPIMAP_CHECKPOINT_FLUSH"),
                                self._tmp_fd, producer=self._journal_queued)
        self.journal_id = uuid.uuid4().hex
        self.journal.append({"k": "head", "format": FORMAT, "journal": self.journal_id,
                             "base": state.generation, "identity": self.ident,
                             "total": state.total, "created": _now()})
        if self.identity_changed:
            self.journal.append({"k": "identity", "identity": self.ident, "total": state.total,
                                 "undone": undone})
        self.run = {"id": self.run_id, "started": _now(), "pid": os.getpid(), "ranks": ranks,
                    "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
                    "slurm_job": os.environ.get("SLURM_JOB_ID"), "versions": _versions(),
                    "done_before": state.ndone}
        state.runs.append(dict(self.run))
        self.journal.append({"k": "run", "run": self.run})
        self.source = _Source(source, self)
        self.catcher.__enter__()

    def _recover(self, snap: _Snapshot, messages: list) -> _Snapshot:
        """Finish what a killed run left: fold its journal (and the rows its references point
        at) into a new run.h5; set a damaged run.h5 aside. Returns the snapshot to start from."""
        path = self.path
        name = os.path.basename(path)
        jpath = _side(path, "journal")
        folder = os.path.dirname(path)
        leftovers = [os.path.join(folder, e) for e in os.listdir(folder)
                     if e.startswith(name + ".tmp-")]
        if snap.base_error is None and not snap.records and not leftovers and \
                not os.path.exists(jpath):
            return snap
        if snap.base_error is not None:
            # Never stops the user: the damaged file is set aside, the journal kept.
            moved = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(path, moved)
            messages.append(f"{name} could not be read ({snap.notes['corrupt']}); it was moved "
                            f"to {os.path.basename(moved)} and is replaced by what "
                            f"{name}.journal holds.")
            snap.state = None
        if snap.notes["stale_journal"] == "other":
            messages.append(f"{name}.journal belongs to another version of {name}; it was "
                            f"ignored.")
        if _has_results(snap.records):
            tmp = _tmp_name(path, "recovery-" + uuid.uuid4().hex[:8])
            if snap.state is not None:
                import shutil

                shutil.copyfile(path, tmp)
                f = _open_file(tmp, "r+")
                state = _read_state(f)
            else:
                f = _new_file(tmp)
                state = _State()
            try:
                store = _Store(f, state, path)
                rows = _RawRows(path)
                notes: dict = {}
                try:
                    for meta, segs, _end in snap.records:
                        _apply(store, meta, segs, rows, notes)
                finally:
                    rows.close()
                ended = {m.get("run") for m, _s, _e in snap.records if m.get("k") == "end"}
                for run in state.runs:  # one journal: one run
                    if not run.get("how") and run.get("id") not in ended:
                        run.update(how="killed (kill -9, out of memory, node failure...); its "
                                       "results were recovered from the journal",
                                   new=notes.get("results", 0), done_after=state.ndone)
                store.finalize(uuid.uuid4().hex, snap.journal_head["journal"])
                f.close()
                _fsync_file(tmp)
                os.replace(tmp, path)
                _fsync_dir(folder)
            except BaseException:
                f.close()
                os.unlink(tmp)
                raise
            msg = (f"{notes.get('results', 0):,} result(s) that a killed run left in "
                   f"{name}.journal were folded into {name}")
            if notes.get("lost"):
                msg += (f"; {notes['lost']:,} whose rows were in a file that is gone will be "
                        f"computed again")
            if snap.notes["torn_bytes"]:
                msg += (f"; the journal's last {snap.notes['torn_bytes']:,} bytes were a torn "
                        f"record (cut off)")
            messages.append(msg + ".")
        for leftover in leftovers + [jpath]:
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        return _Snapshot(path)

    def _read_only(self, base, source) -> bool:
        """A finished map read back (a sequence input, nothing missing, nothing changed): read
        run.h5 itself, with no copy, no journal and no new version."""
        if source.seqs is None or base.total != source.length:
            return False
        skip = base.skip_mask(self.retry_failed)
        if base.total and (len(skip) < base.total or not skip[:base.total].all()):
            return False
        self.readonly = True
        self.f = _open_file(self.path, "r")
        self.st = base
        self.store = _Store(self.f, base, self.path)
        self.skip = skip
        self.any_skip = True
        self.old_total = base.total
        self.source = _Source(source, self)
        self.catcher.__enter__()
        return True

    def _changed_items(self, source, state) -> list:
        """Finished items whose input differs now (sequences: checked before any work)."""
        limit = min(source.length, state.size)
        idx = np.flatnonzero(state.done[:limit] | state.failed[:limit])
        if not len(idx):
            return []
        changed = []
        seqs = source.seqs
        for a in range(0, len(idx), 4096):
            part = idx[a:a + 4096].tolist()
            if source.nargs == 1:
                items = [seqs[0][i] for i in part]
            else:
                items = [tuple(s[i] for s in seqs) for i in part]
            got = np.frombuffer(_identity.digest_items(items), np.uint8).reshape(-1, 16)
            diff = np.any(got != state.digests[part], axis=1)
            changed.extend(np.asarray(part)[diff].tolist())
        return changed


    def _mismatch_message(self, diffs, ndone) -> str:
        name = os.path.basename(self.path)
        files = [self.path] + [p for p in (_side(self.path, "journal"),) if os.path.exists(p)]
        return (f"checkpoint {self.path} was made by another function or for other inputs, so "
                f"its {ndone:,} finished result(s) may not belong to this map. What differs:\n"
                + "".join(f"  - {d}\n" for d in diffs) +
                f"To start fresh, delete {' and '.join(files)} (or give this map another "
                f"checkpoint path). To keep the finished results anyway and compute only the "
                f"missing items, pass checkpoint=mpimap.Checkpoint({name!r}, "
                f"mismatch=\"resume\").")

    # -- the map ---------------------------------------------------------------------------------


    # -- the map ---------------------------------------------------------------------------------

    def skippable_run(self, i, limit) -> int:
        skip = self.skip
        if i >= len(skip) or not skip[i]:
            return 0
        seg = skip[i:i + limit]
        k = int(np.argmin(seg)) if not seg.all() else len(seg)
        if self.source.length is not None and i + k > self.source.length:
            k = max(0, self.source.length - i)
        return k

    def pending_run(self, i, n) -> int:
        skip = self.skip
        if i >= len(skip):
            return n
        seg = skip[i:i + n]
        return int(np.argmax(seg)) if seg.any() else n

    def check_items(self, i, items):
        """Iterator input: compare finished items with their recorded inputs.
        None: all the same; False: differ (the map fails); k: differ from offset k (resume)."""
        st = self.st
        got = np.frombuffer(_identity.digest_items(items), np.uint8).reshape(-1, 16)
        want = st.digests[i:i + len(items)]
        diff = np.flatnonzero(np.any(got != want, axis=1))
        if not len(diff):
            return None
        if self.ck.mismatch != "resume":
            bad = [i + int(d) for d in diff]
            self._fail(CheckpointError(self._mismatch_message(
                [f"the input of item(s) {_item_list(bad)} differs from the one the finished "
                 f"result was computed from"], st.ndone)))
            return False
        first = int(diff[0])
        for off in range(first, len(items)):
            j = i + off
            st.done[j] = st.failed[j] = False
            st.errors.pop(j, None)
        self.skip = st.skip_mask(self.retry_failed)
        self.any_skip = bool(self.skip.any())
        self.identity_changed = True
        self.journal.append({"k": "identity", "identity": self.ident, "total": "keep",
                             "undone": list(range(i + first, i + len(items)))})
        return first

    def note_taken(self, i, items) -> bool:
        st = self.st
        n = len(items)
        if self.old_total is not None and self.source.length is None and \
                i + n > self.old_total and self.ck.mismatch != "resume":
            self._fail(CheckpointError(self._mismatch_message(
                [f"the input has more than the {self.old_total:,} items the checkpoint was "
                 f"made for"], st.ndone)))
            return False
        if self.defer_digests:
            self.taken[i] = items  # digested with the results, off the dispatch path
        else:
            # Serial: before the task runs, which may change a mutable item in place.
            st.grow(i + n)
            st.digests[i:i + n] = np.frombuffer(_identity.digest_items(items),
                                                np.uint8).reshape(n, 16)
        return True

    def input_ended(self, n):
        st = self.st
        if self.source.length is None:
            if self.old_total is not None and n != self.old_total and \
                    self.ck.mismatch != "resume" and self.failure is None:
                self._fail(CheckpointError(self._mismatch_message(
                    [f"the input has {n:,} items; the checkpoint was made for "
                     f"{self.old_total:,}"], st.ndone)))
            if st.total != n and not self.readonly:
                st.total = n
                self.journal.append({"k": "total", "total": n})

    def emit_done(self, i, k) -> bool:
        values, failed = self.store.read(i, i + k, self.retry_failed)
        return self.on_done(i, values, failed) if self.on_done is not None else True

    def _fail(self, exc):
        if self.failure is None:
            self.failure = exc
        if self.on_error is None:
            raise exc
        self.on_error(exc)

    def record(self, start, values, failures=()):
        """Results of items start.. arrived; ``failures``: [(offset, type, message, tb)] whose
        values are the exception objects.

        Numbers and strings (immutable) are only queued here: the journal thread digests their
        items and writes one record per flush interval, and their rows are stored in batches --
        per chunk that is a few microseconds on rank 0 instead of a few hundred. Anything else
        (arrays, failures) is stored and journaled at once."""
        if self.closed or self.readonly or self.broken:
            return
        try:
            self._record(start, values, failures)
        except (OSError, CheckpointError) as exc:
            self._break(exc)

    def _break(self, exc):
        """Writing failed (a full disk...): the map goes on and returns its results; what is on
        disk stays for the next run, which folds it in."""
        self.broken = True
        self.keep_files = True
        print(f"mpimap: checkpoint {self.path}: writing failed ({type(exc).__name__}: {exc}); "
              f"this map goes on WITHOUT saving its results. What was saved so far is kept and "
              f"the next run resumes from it.", file=sys.stderr, flush=True)

    def _record(self, start, values, failures):
        n = len(values)
        items = self.taken.pop(start, None) if self.defer_digests else None
        if self.batching and not failures and set(map(type, values)) <= _IMMUTABLE:
            digests = None if self.defer_digests else self.st.digests[start:start + n].tobytes()
            entry = [start, values, items, digests]
            self.queued.append(entry)   # for the journal thread
            self.unstored.append(entry)  # for the rows, on this thread
            self.unstored_n += n
            self.new += n
            if self.unstored_n >= 8192:
                self._store_queued()
            return
        self._store_queued()
        self._record_now(start, values, failures, items)

    def _digests(self, start, n, items) -> bytes:
        if items is not None:
            return _identity.digest_items(items[:n])
        return self.st.digests[start:start + n].tobytes()

    def _store_queued(self):
        """Rows of the queued results into run.h5.tmp (and the state)."""
        queued, self.unstored, self.unstored_n = self.unstored, [], 0
        for entry in queued:
            if entry[3] is None:  # not yet digested by the journal thread
                entry[3] = _identity.digest_items(entry[2])
            self.store.write(entry[0], entry[1], None, entry[3])

    def _journal_queued(self):
        """Journal thread (or close): one record for every result queued since the last."""
        entries = []
        while self.queued:
            entries.append(self.queued.popleft())
        if not entries:
            return
        chunks = []
        for entry in entries:
            if entry[3] is None:
                entry[3] = _identity.digest_items(entry[2])
            chunks.append((entry[0], len(entry[1]), entry[3]))
        packed = _serial.dumps_data([entry[1] for entry in entries], to_worker=True)
        segments = [packed.data, *packed.buffers]
        self.journal.append({"k": "batch", "chunks": chunks, "codec": packed.codec,
                             "lens": [memoryview(x).nbytes for x in segments]}, segments)

    def _record_now(self, start, values, failures, items):
        n = len(values)
        fails = {off: (t, m, tb) for off, t, m, tb in failures}
        digests = self._digests(start, n, items)
        # The rows first (big arrays are written to run.h5.tmp-RUN here, once), then the record
        unstored, refs = self.store.write(start, values, fails, digests)
        fail_meta = []
        for off, (t, m, tb) in fails.items():
            packed = _pickle_inband(values[off])
            codec, data = packed if packed is not None else (_CODEC_NONE, b"")
            fail_meta.append((off, t, m, tb, codec, data))
        skip = set(fails) | set(unstored)
        plain = values if not skip else [None if off in skip else v
                                         for off, v in enumerate(values)]
        meta = {"k": "res", "start": start, "n": n, "fail": fail_meta, "digests": digests}
        if unstored:
            meta["unstored"] = sorted(unstored)
            self._warn_unstored(start + unstored[0], values[unstored[0]])
        if refs:
            codec, data = _dumps_refs(plain, refs, self.run_id)
            meta.update(codec=codec, refs=True, lens=[len(data)])
            self.journal.append(meta, [data], after_sync=True)
        else:
            packed = _serial.dumps_data(plain, to_worker=True)
            segments = [packed.data, *packed.buffers]
            meta.update(codec=packed.codec, lens=[memoryview(x).nbytes for x in segments])
            self.journal.append(meta, segments)
        self.new += n

    def _warn_unstored(self, i, value):
        if not self.unstored_warned:
            self.unstored_warned = True
            t = type(value)
            print(f"mpimap: checkpoint {self.path}: the result of item {i} ({t.__module__}."
                  f"{t.__qualname__}) cannot be stored: it cannot be pickled. Such items are "
                  f"computed again by the next run.", file=sys.stderr, flush=True)

    def stop_signal(self):
        return _STOP.signum

    def stopped(self):
        return _stop_exception(_STOP.signum)

    def set_in_task(self, flag: bool):
        _STOP.in_task = flag

    # -- closing ---------------------------------------------------------------------------------

    def close(self, failure=None):
        """Write the new run.h5 (when anything changed) and release the files. Then raises the
        stop signal's exception if one arrived and nothing else is being raised."""
        if self.closed:
            return
        self.closed = True
        self.catcher.__exit__(None, None, None)
        st = self.st
        failure = failure or self.failure
        sig = _STOP.signum
        try:
            if not self.readonly and not self.broken:
                self._consolidate(sig, failure)
        finally:
            self._abandon()
        if sig is not None:
            _STOP.signum = None  # consumed by the exception below (a Jupyter kernel goes on)
            total = f"{st.total:,}" if st.total is not None else "?"
            print(f"mpimap: {signal.Signals(sig).name} received: {st.ndone:,} of {total} items "
                  f"done and saved in {self.path}; rerun to resume.", file=sys.stderr,
                  flush=True)
            if failure is None:  # (else that exception, often the stop itself, is on its way)
                raise _stop_exception(sig)

    def _consolidate(self, sig, failure):
        self._store_queued()
        st = self.st
        ndone = st.ndone
        settled = int(np.count_nonzero((st.done | st.failed)[:st.extent]))
        if sig is not None:
            how = f"stopped by {signal.Signals(sig).name}"
        elif failure is not None:
            text = str(failure).splitlines()[0][:200] if str(failure) else ""
            how = f"ended by {type(failure).__name__}: {text}"
        elif st.total is not None and settled >= st.total:
            how = "complete" + (f", {st.nfailed:,} failed" if st.nfailed else "")
        else:
            how = "ended early (the loop over imap() was left)"
        run = dict(self.run, ended=_now(), how=how, new=self.new, done_after=ndone)
        st.runs[-1] = run
        jpath = _side(self.path, "journal")
        if not (self.new or self.identity_changed):
            self.journal.close()  # nothing new: run.h5 stays as it is
            os.unlink(jpath)
            return
        try:
            self.journal.append({"k": "end", "run": self.run_id,
                                 "how": {"ended": run["ended"], "how": how, "new": self.new,
                                         "done_after": ndone}})
            self.journal.close()  # all written and fsynced: the rest may be cut short safely
            self.store.finalize(uuid.uuid4().hex, self.journal_id)
            self.f.close()
            self.f = None
            os.fsync(self._tmp_fd)
            os.replace(self.tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
        except BaseException as exc:
            # The journal (and the rows in run.h5.tmp-RUN it points at) stay: the next run
            # folds them in.
            self.keep_files = True
            print(f"mpimap: checkpoint {self.path}: could not write its new version "
                  f"({type(exc).__name__}: {exc}); the results are kept in {jpath} and the "
                  f"next run folds them in", file=sys.stderr, flush=True)
            return
        try:
            os.unlink(jpath)  # folded into run.h5, which names it: a stale copy is ignored
        except OSError:
            pass

    def _abandon(self):
        """Release every file; the working copy and the journal are removed unless they hold
        results (``keep_files``) or the working copy became run.h5."""
        if self.f is not None:
            try:
                self.f.close()
            except Exception:
                pass
            self.f = None
        if self.journal is not None and not self.journal.closed:
            try:
                self.journal.close()
            except Exception:
                pass
        if self._tmp_fd is not None:
            os.close(self._tmp_fd)
            self._tmp_fd = None
        if not self.keep_files:
            for leftover in (self.tmp, _side(self.path, "journal") if not self.closed else None):
                if leftover and os.path.exists(leftover) and not self.readonly:
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_map(ck: Checkpoint, func, source, *, common=None, has_common=False, seed=None,
             errors="raise", ranks=1) -> MapCheckpoint:
    """Start a checkpointed map over ``source`` (an ItemSource); see MapCheckpoint.

    Raises CheckpointError (before any work) when the file belongs to another map."""
    del errors  # the map's errors= decides what a recorded failure does (see _driver, _runtime)
    ident = _identity_of(func, common, has_common, seed, source.nargs, ck.extra)
    return MapCheckpoint(ck, ident, source, ranks)
