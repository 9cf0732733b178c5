"""What moves bytes between rank 0 and the workers.

A ``Frame`` is one logical message: a kind, a small ``meta`` value and a list of ``Packed``
payloads. ``encode`` turns it into a *head* (one bytes object: a length-prefixed pickle of
(kind, meta, layout) followed by every small segment) and *bulk* segments (big pickle streams and
array buffers), which travel as separate raw messages and are received straight into their final
memory. ``decode`` rebuilds the Frame with zero-copy views.

Two transports implement the same two small protocols (``Hub`` on rank 0, ``Endpoint`` on a
worker): ``_mpi.MPIHub``/``MPIEndpoint`` over MPI, and ``InProcHub`` here, whose workers are threads
of the same process and whose messages still go through encode/decode -- most driver tests run on it
without MPI.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._serial import Packed

__all__ = ["Event", "Frame", "InProcHub", "WorkerInfo", "decode", "encode"]

_LEN = struct.Struct("<Q")

# Frame kinds. Down: rank 0 -> worker.
TASK = 1  # meta: dict(job, chunk, start, n, spec?, puts?, drop?); payloads: puts..., items
CANCEL = 2  # meta: job id
DROP = 3  # meta: dict(drop=[object ids], forget=[job ids])
POOL = 4  # meta: dict(pool, init, puts); payloads: puts...
RELEASE = 5  # collective mode: return from serving to the caller's script
SHUTDOWN = 6
PUT = 7  # meta: dict(puts); payloads: puts...
BUNDLE = 8  # meta: dict(op=query|begin|data|end|use, id, ...); payloads: data pieces (_stage)
# Up: worker -> rank 0.
RESULT = 11  # meta: dict(job, chunk, n, seconds, errors=[...]); payloads: results, exceptions...
REPLY = 12  # meta: dict(what, ok, ...)


@dataclass
class Frame:
    kind: int
    meta: Any = None
    payloads: list = None

    def __post_init__(self):
        if self.payloads is None:
            self.payloads = []


class WorkerInfo(NamedTuple):
    rank: int
    host: str
    node: str
    pid: int


class Event(NamedTuple):
    """What ``Hub.poll`` reports: a frame from ``rank``, or ``frame is None`` when it was lost."""

    rank: int
    frame: Frame | None
    reason: str = ""


def encode(frame: Frame, inline_max: int, kinds: list | None = None):
    """(head bytes, [bulk memoryviews]) for ``frame``.

    ``kinds``, if given, gets one entry per bulk segment: True for an out-of-band array buffer,
    False for a pickle stream (``_nodeshare`` shares only the former across a node).
    """
    layout = []
    small = []
    bulk = []
    for p in frame.payloads:
        segs = []
        for j, seg in enumerate((p.data, *p.buffers)):
            view = memoryview(seg)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if view.nbytes <= inline_max:
                segs.append((0, view.nbytes))
                small.append(view)
            else:
                segs.append((1, view.nbytes))
                bulk.append(view)
                if kinds is not None:
                    kinds.append(j > 0)
        layout.append((p.codec, segs))
    header = pickle.dumps((frame.kind, frame.meta, layout), protocol=5)
    head = b"".join([_LEN.pack(len(header)), header, *small])
    return head, bulk


def decode_head(head):
    """Parse a head: (kind, meta, layout, offset of the first inline segment)."""
    view = memoryview(head)
    (hlen,) = _LEN.unpack_from(view, 0)
    kind, meta, layout = pickle.loads(view[_LEN.size:_LEN.size + hlen])
    return kind, meta, layout, _LEN.size + hlen


def bulk_sizes(layout) -> list[int]:
    return [n for _codec, segs in layout for is_bulk, n in segs if is_bulk]


def assemble(kind, meta, layout, head, offset, bulk) -> Frame:
    """Frame from a parsed head and its received bulk buffers."""
    view = memoryview(head)
    bulk_iter = iter(bulk)
    payloads = []
    for codec, segs in layout:
        parts = []
        for is_bulk, n in segs:
            if is_bulk:
                parts.append(memoryview(next(bulk_iter)).cast("B"))
            else:
                parts.append(view[offset:offset + n])
                offset += n
        payloads.append(Packed(codec, parts[0], parts[1:]))
    return Frame(kind, meta, payloads)


def decode(head, bulk) -> Frame:
    kind, meta, layout, offset = decode_head(head)
    return assemble(kind, meta, layout, head, offset, bulk)


# ----------------------------------------------------------------------------------------------
# In-process transport: worker threads, same bytes path.

class _Pipe:
    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def put(self, frame: Frame, inline_max: int) -> None:
        head, bulk = encode(frame, inline_max)
        # Copy the bulk: the sender may reuse its buffers once send() returns, as with MPI.
        self.q.put((bytes(head), [bytearray(b) for b in bulk]))

    def get(self, timeout):
        try:
            item = self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None
        if item is None:
            return None
        return decode(*item)


class InProcEndpoint:
    """A worker thread's side of the in-process transport."""

    collective = False

    def __init__(self, hub: "InProcHub", rank: int, node: str = "inproc"):
        self.hub = hub
        self.rank = rank
        self.size = hub.nworkers + 1
        self.info = WorkerInfo(rank, socket.gethostname(), node, os.getpid())
        self.down = _Pipe()

    def recv(self, timeout=None):
        return self.down.get(timeout)

    def send(self, frame: Frame) -> None:
        if self.hub.killed.get(self.rank):
            return
        self.hub.up.put((self.rank, frame), self.hub.inline_max)

    def flush(self) -> None:
        pass


class _UpPipe(_Pipe):
    def put(self, item, inline_max):
        rank, frame = item
        head, bulk = encode(frame, inline_max)
        self.q.put((rank, bytes(head), [bytearray(b) for b in bulk]))

    def get(self, timeout):
        try:
            item = self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None
        rank, head, bulk = item
        if head is None:
            return Event(rank, None, bulk)
        return Event(rank, decode(head, bulk))


class InProcHub:
    """Rank 0's side of the in-process transport; ``nworkers`` threads run ``_worker.serve``.

    ``kill(rank)`` simulates a worker that died: its frames stop and poll() reports it lost.
    ``nodes``: a node name per worker (default all "inproc"), for per-node logic in tests.
    """

    collective = False

    def __init__(self, nworkers: int = 2, inline_max: int = 64 << 10, nodes=None):
        from . import _worker

        self.nworkers = nworkers
        self.inline_max = inline_max
        self.up = _UpPipe()
        self.killed: dict[int, bool] = {}
        nodes = list(nodes) if nodes is not None else ["inproc"] * nworkers
        self.endpoints = {r: InProcEndpoint(self, r, nodes[r - 1])
                          for r in range(1, nworkers + 1)}
        self.info = {r: ep.info for r, ep in self.endpoints.items()}
        self.threads = []
        for ep in self.endpoints.values():
            t = threading.Thread(target=_worker.serve, args=(ep,), kwargs={"inproc": True},
                                 daemon=True, name=f"mpimap-inproc-{ep.rank}")
            t.start()
            self.threads.append(t)

    @property
    def ranks(self):
        return list(self.endpoints)

    def send(self, rank: int, frame: Frame) -> None:
        if not self.killed.get(rank):
            self.endpoints[rank].down.put(frame, self.inline_max)

    def bcast(self, ranks, frame: Frame, readonly: bool = False) -> None:
        for r in ranks:
            self.send(r, frame)

    def poll(self, timeout, spin=0.0):
        events = []
        ev = self.up.get(timeout)
        while ev is not None:
            events.append(ev)
            ev = self.up.get(0)
        return events

    def kill(self, rank: int, reason: str = "killed by test") -> None:
        self.killed[rank] = True
        self.up.q.put((rank, None, reason))

    def close(self) -> None:
        for r, ep in self.endpoints.items():
            if not self.killed.get(r):
                ep.down.put(Frame(SHUTDOWN), self.inline_max)
        for r, t in zip(self.endpoints, self.threads):
            if not self.killed.get(r):
                t.join(timeout=5)
