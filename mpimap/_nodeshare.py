"""One copy per node of the large arrays rank 0 broadcasts (common data, captured arrays).

The data flow of one broadcast frame whose out-of-band array buffers total at least
MPIMAP_SHARE_MIN bytes (``MPIHub.bcast`` -> ``NodeShare.send``; ``_Conn._receive`` ->
``NodeShare.receive``)::

    rank 0                         receiver of node B (its first rank)     other ranks of node B
    head ─── p2p, one per worker ──────────────────────────────────────────────────────────▶
    small bulk (pickle streams) ── Ibcast over the whole comm: per-rank copies ─────────────▶
    array buffers ─ Ibcast over `leaders` ─▶ bounce ─pwrite─▶ segment (memfd)
                    (pieces <= 32 MiB)        locator (pid, fd, inode) ── p2p, node comm ──▶ mmap
                                              close fd ◀── ack once mapped ─── p2p, node comm ─┘
    rank 0's own node: rank 0 is the receiver: its arrays ─pwrite─▶ segment ─ locator ─▶ mmap

``leaders`` is a communicator made once per run (``_mpi.Session``): rank 0 plus the first rank
of every node. Every buffer therefore crosses the network once per node, not once per rank, and
each node holds one copy (``_shm``: a memfd the node's ranks map). Rank 0 keeps its own arrays,
so rank 0's node holds two copies in all (its own and the shared one).

Ordering. MPI needs every member of a communicator to enter its collectives in the same order,
and never matches a blocking collective with a non-blocking one. Workers handle frames strictly
in order and rank 0 posts in frame order, so per frame every rank takes the same steps in the
same order: (1) whole-comm Ibcast of the small bulk, (2) leaders Ibcast of the array buffers,
(3) the node's locator and acks -- p2p, so nobody waits for a rank that has not reached the
frame, and an ack needs no progress from its sender after it is posted. Nobody waits
"upstream": a worker waits for its receiver, a receiver for rank 0, rank 0 for nobody. (So a
rank busy in a long task delays its node's copy, exactly as it delays its own next frame.)

The other ranks map the segment once it is full. Mapping it earlier, so that their
MAP_POPULATE allocates pages while the receiver writes, was measured and lost (1 GiB, 3 ranks
on 2 cores: 1.0-1.1 s against 0.7-0.8 s): the populating ranks compete with the writer.

Per node, a probe at start-up picks how the node shares (``kind``): "memfd" (default), "file"
(a 0600 file in /dev/shm, unlinked once every local rank has mapped it) or "copy" (neither
works: the receiver hands every local rank a private copy with an Ibcast over the node comm).
MPIMAP_SHARE forces one; "off" skips all of this (every rank its own copy, one Ibcast).

Release. A receiver keeps its segment's fd (and name) until every other rank of the node has
acknowledged mapping it, or -- on rank 0, which learns of deaths -- has died. After that the
memory belongs to the mappings alone and goes when the last array built on it is garbage
collected: on the workers when rank 0 drops the object -- at the end of the map; for a Pool's
common data, its initializer's arguments and the large functions its maps used, when the pool
closes (``_driver``). A memfd has no name, so nothing can be left behind in /dev/shm.

This module imports no mpi4py: it drives the communicators ``_mpi`` hands it.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import time

from . import _shm
from ._env import knob

__all__ = ["NodeShare", "pack_plan", "split_plan", "payloads_of"]

TAG_LOC = 201
TAG_ACK = 202
PIECE = 32 << 20  # leaders' pieces: a receiver's bounce buffer, big enough to stream
_LEN = struct.Struct("<Q")

# What this process did, for tests and benchmarks: bytes it received for a node, segments it
# created / mapped, and how its node shares.
STATS = {"received": 0, "created": 0, "mapped": 0, "copies": 0, "kind": None}


def pack_plan(plan: dict) -> bytes:
    data = pickle.dumps(plan, protocol=5)
    return _LEN.pack(len(data)) + data


def split_plan(head):
    """(plan, rest of the head) from a head that starts with a packed plan."""
    view = memoryview(head)
    (n,) = _LEN.unpack_from(view, 0)
    return pickle.loads(view[_LEN.size:_LEN.size + n]), view[_LEN.size + n:]


def payloads_of(layout, indices) -> set:
    """Which payloads (by position) hold the bulk segments numbered ``indices``."""
    out = set()
    k = 0
    for p, (_codec, segs) in enumerate(layout):
        for is_bulk, _n in segs:
            if is_bulk:
                if k in indices:
                    out.add(p)
                k += 1
    return out


def _anon(n: int):
    """A private receive buffer: an anonymous mapping, no page touched before MPI writes it."""
    return mmap.mmap(-1, max(n, 1))


def _pieces(offset, n, limit):
    for off in range(0, n, limit):
        yield offset + off, min(limit, n - off)


class _Held:
    """A segment this receiver created, kept open until every local rank has acknowledged it."""

    __slots__ = ("segment", "acks")

    def __init__(self, segment, acks):
        self.segment = segment
        self.acks = acks  # node rank -> (request, buffer)


class NodeShare:
    """This rank's part in node-shared broadcasts. Collective to construct (it probes the node)."""

    def __init__(self, comm, node, leaders, local):
        self.comm = comm
        self.node = node
        self.leaders = leaders  # None unless this rank is its node's receiver
        self.local = list(local)  # world ranks on this node, by node rank
        self.node_rank = node.Get_rank()
        self.node_size = node.Get_size()
        self.max_message = knob("MPIMAP_MAX_MESSAGE")
        self.share_min = knob("MPIMAP_SHARE_MIN")
        self.piece = min(PIECE, self.max_message)
        self.mode = knob("MPIMAP_SHARE")
        self.pending: list = []  # (request, buffer kept alive)
        self.held: list[_Held] = []
        self.why = ""
        self.kind = self._probe() if self.mode != "off" else "off"
        STATS["kind"] = self.kind

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    # -- start-up --------------------------------------------------------------------------------

    def _probe(self) -> str:
        """Agree, over the node, on the first segment kind every local rank can map."""
        wanted = {"auto": _shm.KINDS, "memfd": ("memfd",), "file": ("file",),
                  "copy": ()}[self.mode]
        if self.node_size == 1:
            return wanted[0] if wanted else "copy"
        reasons = []
        for kind in wanted:
            probe = _shm.probe_create(kind) if self.node_rank == 0 else None
            loc = self.node.bcast(probe.locator if probe else None, root=0)
            problem = None if self.node_rank == 0 else _shm.probe_check(loc)
            if self.node_rank == 0 and loc[0] == "error":
                problem = loc[1]
            problems = self.node.allgather(problem)
            if probe is not None and probe.segment is not None:
                probe.segment.release()
            bad = [p for p in problems if p]
            if not bad:
                return kind
            reasons.append(bad[0])
        self.why = "; ".join(reasons)
        return "copy"

    # -- rank 0 ----------------------------------------------------------------------------------

    def plan(self, bulk, kinds, readonly: bool):
        """How a broadcast frame's bulk segments travel; None: the plain way (per-rank copies).

        Array buffers (not pickle streams, which are rebuilt into per-rank objects anyway) go
        into one node-shared segment when they total at least MPIMAP_SHARE_MIN bytes.
        """
        if not self.enabled:
            return None
        idx = [i for i, is_buffer in enumerate(kinds) if is_buffer]
        sizes = [bulk[i].nbytes for i in idx]
        if not idx or sum(sizes) < self.share_min:
            return None
        offsets, total = _shm.layout(sizes)
        return {"size": total, "place": list(zip(idx, offsets, sizes)),
                "access": "read" if readonly else "copy", "piece": self.piece,
                "max": self.max_message}

    def send(self, plan, bulk, progress) -> None:
        """Rank 0: stream the shared buffers to the other receivers, fill its own node's copy."""
        piece = plan["piece"]
        if self.leaders is not None and self.leaders.Get_size() > 1:
            for i, off, n in plan["place"]:
                view = bulk[i]
                for pos, m in _pieces(0, n, piece):
                    part = view[pos:pos + m]
                    self.pending.append((self.leaders.Ibcast(part, root=0), part))
        if self.node_size == 1:
            return  # no worker on rank 0's node
        if self.kind == "copy":
            self._send_locators(("copy", plan["size"]))
            for i, off, n in plan["place"]:
                for pos, m in _pieces(0, n, plan["max"]):
                    part = bulk[i][pos:pos + m]
                    self.pending.append((self.node.Ibcast(part, root=0), part))
            STATS["copies"] += 1
            return
        try:
            seg = _shm.Segment(self.kind, plan["size"])
        except OSError as exc:
            self._send_locators(("error", self._no_segment(plan, exc)))
            return
        try:
            for i, off, n in plan["place"]:
                for pos, m in _pieces(0, n, piece):
                    seg.write(off + pos, bulk[i][pos:pos + m])
                    progress()  # the other nodes' pieces move while we copy ours
        except OSError as exc:
            seg.release()
            self._send_locators(("error", self._no_segment(plan, exc)))
            return
        STATS["created"] += 1
        self._hold(seg)

    # -- workers -----------------------------------------------------------------------------------

    def receive(self, plan, wait) -> list:
        """A worker's part of a shared broadcast: buffers (one per plan["place"] entry).

        Raises ShareUnavailable, after taking every step the others expect of this rank, when
        this node could not get its copy.
        """
        if self.node_rank == 0:
            return self._receive_as_receiver(plan, wait)
        buf = bytearray(_shm.LOCATOR_BYTES)
        wait(self.node.Irecv(buf, source=0, tag=TAG_LOC))
        loc = _shm.unpack_locator(buf)
        if loc[0] == "error":
            raise _shm.ShareUnavailable(loc[1])
        if loc[0] == "copy":
            mem = _anon(plan["size"])
            for i, off, n in plan["place"]:
                for pos, m in _pieces(off, n, plan["max"]):
                    wait(self.node.Ibcast(memoryview(mem)[pos:pos + m], root=0))
            STATS["copies"] += 1
            return self._views(mem, plan)
        try:
            mem = _shm.open_located(loc, plan["access"])
        except (OSError, ValueError) as exc:
            raise _shm.ShareUnavailable(
                f"rank {self.comm.Get_rank()} could not map its node's shared copy "
                f"({type(exc).__name__}: {exc}). Fix: MPIMAP_SHARE=file, or =copy for a "
                f"private copy per rank") from None
        finally:
            ack = bytearray(1)
            self.pending.append((self.node.Isend(ack, dest=0, tag=TAG_ACK), ack))
        STATS["mapped"] += 1
        return self._views(mem, plan)

    def _receive_as_receiver(self, plan, wait) -> list:
        size = plan["size"]
        seg = None
        problem = None
        if self.kind == "copy":
            mem = _anon(size)
            for i, off, n in plan["place"]:
                for pos, m in _pieces(off, n, plan["piece"]):
                    wait(self.leaders.Ibcast(memoryview(mem)[pos:pos + m], root=0))
                    STATS["received"] += m
            if self.node_size > 1:
                self._send_locators(("copy", size))
                for i, off, n in plan["place"]:
                    for pos, m in _pieces(off, n, plan["max"]):
                        part = memoryview(mem)[pos:pos + m]
                        self.pending.append((self.node.Ibcast(part, root=0), part))
            STATS["copies"] += 1
            return self._views(mem, plan)
        try:
            seg = _shm.Segment(self.kind, size)
        except OSError as exc:
            problem = self._no_segment(plan, exc)
        piece = plan["piece"]
        bounce = _anon(min(piece, size))
        for i, off, n in plan["place"]:
            for pos, m in _pieces(off, n, piece):
                part = memoryview(bounce)[:m]
                wait(self.leaders.Ibcast(part, root=0))
                STATS["received"] += m
                if problem is None:
                    try:
                        seg.write(pos, part)
                    except OSError as exc:
                        problem = self._no_segment(plan, exc)
        del bounce, part  # freed now, not at the end of the map
        if problem is None:
            try:
                mem = seg.map(plan["access"])
            except OSError as exc:
                problem = self._no_segment(plan, exc)
        if problem is not None:
            if seg is not None:
                seg.release()
            self._send_locators(("error", problem))
            raise _shm.ShareUnavailable(problem)
        STATS["created"] += 1
        self._hold(seg)
        return self._views(mem, plan)

    @staticmethod
    def _views(mem, plan) -> list:
        view = memoryview(mem)
        return [view[off:off + n] for _i, off, n in plan["place"]]

    def _no_segment(self, plan, exc) -> str:
        gib = plan["size"] / (1 << 30)
        return (f"could not make the shared copy of {gib:.2f} GiB on rank "
                f"{self.comm.Get_rank()} ({os.uname().nodename}, kind {self.kind}): "
                f"{type(exc).__name__}: {exc}. Fix: free memory on the node (or /dev/shm space "
                f"for MPIMAP_SHARE=file), or send less data per map")

    # -- locators, acks, release -------------------------------------------------------------------

    def _send_locators(self, loc) -> None:
        for r in range(1, self.node_size):
            buf = _shm.pack_locator(loc)
            self.pending.append((self.node.Isend(buf, dest=r, tag=TAG_LOC), buf))

    def _hold(self, seg) -> None:
        """Announce ``seg`` to the node and keep it until every local rank has mapped it."""
        if self.node_size == 1:
            seg.release()  # our own mapping (if any) keeps the pages
            return
        acks = {}
        for r in range(1, self.node_size):
            buf = bytearray(1)
            acks[r] = (self.node.Irecv(buf, source=r, tag=TAG_ACK), buf)
        self._send_locators(seg.locator())
        self.held.append(_Held(seg, acks))

    def progress(self) -> None:
        """Complete sends and release segments every local rank has mapped. Cheap when idle."""
        if self.pending:
            self.pending = [(r, b) for r, b in self.pending if not r.Test()]
        if self.held:
            keep = []
            for h in self.held:
                for r in [r for r, (req, _b) in h.acks.items() if req.Test()]:
                    del h.acks[r]
                if h.acks:
                    keep.append(h)
                else:
                    h.segment.release()
            self.held = keep

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.held)

    def lost(self, world_rank: int) -> None:
        """A rank died (rank 0 learns it): stop waiting for its acks."""
        if world_rank not in self.local:
            return
        r = self.local.index(world_rank)
        for h in self.held:
            h.acks.pop(r, None)  # its Irecv stays posted; the process is gone
        self.progress()

    def close(self, timeout: float = 2.0) -> None:
        """End of the run: finish what is in flight (briefly), release every segment."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            self.progress()
            time.sleep(1e-3)
        for h in self.held:
            h.segment.release()
        self.held = []

