"""The MPI transport: the only module that imports mpi4py.

Messages. A frame (see ``_transport``) is one *head* message (tag TAG_HEAD) plus its *bulk*
segments (tag TAG_BULK, each split into pieces of at most MPIMAP_MAX_MESSAGE bytes so no count
overflows a C int on any MPI). Heads are matched with ``Improbe``/``Mrecv``; the bulk that follows
a head comes from the same source on another tag, so it can never be taken for a head. Bulk is
received straight into its final, uninitialised buffer (``numpy.empty``), and arrays are rebuilt on
it without a copy. A broadcast frame sends its head point-to-point and its bulk with ``Ibcast``;
when its array buffers are large they go once per node into node-shared memory instead
(``_nodeshare``: rank 0 -> one receiver per node over the ``leaders`` communicator -> a memfd the
node's ranks map). Only a few tags are used; an item index is never a tag.

Waiting without spinning. MPICH (like most MPIs) busy-polls inside a blocking receive: a rank
waiting in ``Recv`` burns a core, and on a node where ranks share cores that halves throughput. So
every worker keeps a TCP *lifeline* to rank 0. The sender of a frame writes one byte on the lifeline
after posting it; the receiver sleeps in ``select`` on its lifeline(s), wakes within microseconds,
and then polls MPI until it has as many frames as bytes arrived. The lifeline is also how a dead
rank is seen: its socket closes when the process dies (any signal, OOM, os._exit), and rank 0
reports it; a worker whose lifeline to rank 0 closes exits. Where a lifeline cannot be opened (a
firewall between nodes), that rank falls back to polling MPI with a sleep of at most
MPIMAP_POLL_MAX between polls.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import select
import selectors
import socket
import struct
import sys
import time

from mpi4py import MPI

from . import _nodeshare, _shm
from ._env import knob
from ._serial import CODEC_PICKLE, Packed
from ._transport import Event, WorkerInfo, assemble, bulk_sizes, decode_head, encode

__all__ = ["MPIEndpoint", "MPIHub", "Session"]

TAG_HEAD = 101
TAG_BULK = 102
_P2P = b"\0"
_COLL = b"\1"
_SHARED = b"\2"  # like _COLL, and a plan (``_nodeshare``) follows: array buffers go per node
_HELLO = struct.Struct("<i16s")


def _empty(n: int):
    """A byte buffer for a receive. Big ones are anonymous mappings: page-aligned, and no page is
    touched (zeroed) before MPI writes it -- and no numpy import (~0.1 s) on the first one."""
    if n < (1 << 16):
        return bytearray(n)
    return mmap.mmap(-1, n)


def _pieces(view, limit):
    for off in range(0, view.nbytes, limit):
        yield view[off:off + limit]


class _Sleeper:
    """Backoff for the short waits where MPI itself must progress (a transfer under way)."""

    def __init__(self, cap):
        self.cap = cap
        self.delay = 0.0

    def reset(self):
        self.delay = 0.0

    def sleep(self, limit=None):
        self.delay = min(self.cap, self.delay * 2 or 2e-5)
        time.sleep(self.delay if limit is None else max(0.0, min(self.delay, limit)))


class _Conn:
    """Common parts of both ends: sending frames, receiving bulk, pending requests."""

    def __init__(self, comm, share=None):
        self.comm = comm
        self.share = share
        self.max_message = knob("MPIMAP_MAX_MESSAGE")
        self.inline_max = knob("MPIMAP_INLINE_MAX")
        self.pending: list = []  # (request, buffer kept alive)
        self.sleeper = _Sleeper(knob("MPIMAP_POLL_MAX"))

    def _post(self, dest: int, frame) -> None:
        head, bulk = encode(frame, self.inline_max)
        head = _P2P + head
        self.pending.append((self.comm.Isend([head, MPI.BYTE], dest, TAG_HEAD), head))
        for seg in bulk:
            for piece in _pieces(seg, self.max_message):
                self.pending.append((self.comm.Isend([piece, MPI.BYTE], dest, TAG_BULK), piece))

    def _progress_sends(self) -> None:
        if self.pending:
            done = MPI.Request.Testsome([r for r, _b in self.pending])
            if done:
                keep = set(range(len(self.pending))) - set(done)
                self.pending = [self.pending[i] for i in sorted(keep)]
        if self.share is not None and self.share.busy:
            self.share.progress()

    def _receive(self, msg, status):
        """Receive a matched head and its bulk; returns a Frame."""
        source = status.Get_source()
        head = bytearray(status.Get_count(MPI.BYTE))
        msg.Recv([head, MPI.BYTE])
        mode, head = head[:1], memoryview(head)[1:]
        plan = None
        if mode == _SHARED:
            plan, head = _nodeshare.split_plan(head)
        kind, meta, layout, offset = decode_head(head)
        shared = set() if plan is None else {i for i, _off, _n in plan["place"]}
        bulk = []
        for i, n in enumerate(bulk_sizes(layout)):
            if i in shared:
                bulk.append(b"")  # filled below, from the node's copy
                continue
            buf = _empty(n)
            view = memoryview(buf).cast("B")
            for piece in _pieces(view, self.max_message):
                if mode != _P2P:
                    req = self.comm.Ibcast([piece, MPI.BYTE], root=0)
                    self._wait(req)
                else:
                    self.comm.Recv([piece, MPI.BYTE], source, TAG_BULK)
            bulk.append(buf)
        if plan is None:
            return source, assemble(kind, meta, layout, head, offset, bulk)
        try:
            views = self.share.receive(plan, self._wait)
        except _shm.ShareUnavailable as exc:
            frame = assemble(kind, meta, layout, head, offset, bulk)
            # Loading a payload that lost its arrays raises this error where it is loaded.
            for p in _nodeshare.payloads_of(layout, shared):
                frame.payloads[p] = Packed(CODEC_PICKLE, _shm.failing_pickle(str(exc)), [])
            return source, frame
        for (i, _off, _n), view in zip(plan["place"], views):
            bulk[i] = view
        return source, assemble(kind, meta, layout, head, offset, bulk)

    def _wait(self, req):
        """Wait for a transfer: yield the core at first (bulk usually streams in), then sleep
        with a growing delay so a long wait (a busy sender) does not spin a core."""
        sleeper = _Sleeper(self.sleeper.cap)
        t0 = time.monotonic()
        while not req.Test():
            self._progress_sends()
            if time.monotonic() - t0 < 2e-3:
                os.sched_yield()
            else:
                sleeper.sleep()


class MPIHub(_Conn):
    """Rank 0's end: sends to workers, collects their frames, watches their lifelines."""

    collective = True

    def __init__(self, session):
        super().__init__(session.comm, getattr(session, "share", None))
        self.session = session
        self.info = {r: i for r, i in session.info.items() if r != 0}
        self.socks = dict(session.lifelines)  # rank -> socket
        self.selector = selectors.DefaultSelector()  # epoll: O(ready), not O(ranks)
        for r, sock in self.socks.items():
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, r)
        self.expected = {r: 0 for r in self.info}
        self.lost: set = set()
        self.closing: dict = {}  # rank -> (deadline, reason): lifeline closed, frames due
        self.no_lifeline = set(self.info) - set(self.socks)
        self.status = MPI.Status()

    @property
    def ranks(self):
        return sorted(self.info)

    def _ring(self, rank: int) -> None:
        sock = self.socks.get(rank)
        if sock is not None:
            _ring(sock)

    def send(self, rank: int, frame) -> None:
        if rank in self.lost:
            return
        self._post(rank, frame)
        self._ring(rank)
        self._progress_sends()

    def bcast(self, ranks, frame, readonly: bool = False) -> None:
        """Send ``frame`` to ``ranks``: collectively when that is every worker (large array
        buffers then once per node, see ``_nodeshare``; ``readonly``: mapped read-only, else
        copy-on-write), else point-to-point."""
        ranks = [r for r in ranks if r not in self.lost]
        every = not self.lost and sorted(ranks) == self.ranks
        if not every:
            for r in ranks:
                self.send(r, frame)
            return
        kinds: list = []
        head, bulk = encode(frame, self.inline_max, kinds)
        plan = None if self.share is None else self.share.plan(bulk, kinds, readonly)
        head = (_COLL if plan is None else _SHARED + _nodeshare.pack_plan(plan)) + head
        for r in ranks:
            self.pending.append((self.comm.Isend([head, MPI.BYTE], r, TAG_HEAD), head))
            self._ring(r)
        shared = set() if plan is None else {i for i, _off, _n in plan["place"]}
        for i, seg in enumerate(bulk):
            if i in shared:
                continue
            for piece in _pieces(seg, self.max_message):
                self.pending.append((self.comm.Ibcast([piece, MPI.BYTE], root=0), piece))
        if plan is not None:
            self.share.send(plan, bulk, self._progress_sends)
        self._progress_sends()

    def _drain(self, events) -> None:
        while True:
            msg = self.comm.Improbe(MPI.ANY_SOURCE, TAG_HEAD, self.status)
            if msg is None:
                return
            rank, frame = self._receive(msg, self.status)
            self.expected[rank] -= 1
            events.append(Event(rank, frame))

    def _read_lifelines(self, timeout, events) -> None:
        """Count doorbells and notice closed lifelines; waits up to ``timeout`` for one."""
        if timeout != 0 and not self.socks:
            time.sleep(timeout)
            return
        for key, _mask in self.selector.select(timeout):
            sock = key.fileobj
            rank = key.data
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                data = b""
                reason = f"its process ended: {exc.strerror or exc}"
            else:
                reason = "its process ended"
            if data:
                self.expected[rank] += len(data)
            else:
                self._mark_lost(rank, reason, events)

    def _mark_lost(self, rank, reason, events):
        sock = self.socks.pop(rank, None)
        if sock is not None:
            self.selector.unregister(sock)
            sock.close()
        if self.expected.get(rank, 0) > 0:
            # It rang for frames we have not received yet (TCP and MPI race): take them first.
            self.closing[rank] = (time.monotonic() + 2.0, reason)
            return
        if rank not in self.lost:
            self.lost.add(rank)
            if self.share is not None:
                self.share.lost(rank)
            events.append(Event(rank, None, reason))

    def _check_closing(self, events):
        now = time.monotonic()
        for rank, (deadline, reason) in list(self.closing.items()):
            if self.expected.get(rank, 0) <= 0 or now > deadline:
                del self.closing[rank]
                self._mark_lost(rank, reason, events)

    def poll(self, timeout, spin: float = 0.0):
        """Frames and losses; waits up to ``timeout`` s (None: until there is something).

        ``spin``: poll MPI for up to this long first (yielding the core), because a wake-up from
        ``select`` costs ~0.1 ms on a busy node; then sleep. Doorbells are read on every pass so
        a lifeline's buffer never fills, and no sleep lasts more than 1 s: a lost doorbell costs
        at most that, never a hang.
        """
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + spin
        events: list = []
        self.sleeper.reset()
        while True:
            self._progress_sends()
            self._drain(events)
            self._read_lifelines(0, events)
            if self.closing:
                self._check_closing(events)
            if events:
                return events
            now = time.monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                return events
            if now < spin_until:
                os.sched_yield()
                continue
            busy = self.pending or self.closing or self.no_lifeline - self.lost or \
                any(n > 0 for r, n in self.expected.items() if r not in self.lost)
            if busy:
                self.sleeper.sleep(left)
            else:
                self._read_lifelines(min(left, 1.0) if left is not None else 1.0, events)

    def close(self) -> None:
        deadline = time.monotonic() + 5
        while self.pending and time.monotonic() < deadline:
            self._progress_sends()
            time.sleep(1e-4)
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()


class RankZeroGone(Exception):
    """The lifeline to rank 0 closed: rank 0 is gone, this worker must stop."""


class MPIEndpoint(_Conn):
    """A worker's end."""

    collective = True

    def __init__(self, session):
        super().__init__(session.comm, getattr(session, "share", None))
        self.session = session
        self.rank = session.rank
        self.size = session.size - 1
        self.info = session.info[self.rank]
        self.sock = session.lifelines.get(0)
        self.expected = 0
        self.status = MPI.Status()
        self.spin = knob("MPIMAP_SPIN")
        self.spin_next = False

    def send(self, frame) -> None:
        self.spin_next = True  # rank 0 usually answers a result within microseconds
        self._post(0, frame)
        if self.sock is not None and not _ring(self.sock):
            raise RankZeroGone()
        self._progress_sends()

    def flush(self) -> None:
        sleeper = _Sleeper(self.sleeper.cap)
        while self.pending:
            self._progress_sends()
            if self.pending:
                sleeper.sleep()

    def recv(self, timeout=None):
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        spin_until = now + (self.spin if self.spin_next and timeout != 0 else 0.0)
        self.sleeper.reset()
        while True:
            self._progress_sends()
            msg = self.comm.Improbe(0, TAG_HEAD, self.status)
            if msg is not None:
                self.expected -= 1
                self.spin_next = False
                return self._receive(msg, self.status)[1]
            self._read_lifeline(0)
            now = time.monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                return None
            if now < spin_until:
                os.sched_yield()
                continue
            self.spin_next = False
            if self.pending or self.sock is None or self.expected > 0:
                self.sleeper.sleep(left)
            else:
                self._read_lifeline(min(left, 1.0) if left is not None else 1.0)

    def _read_lifeline(self, timeout):
        if self.sock is None:
            return
        if timeout:
            try:
                ready, _w, _x = select.select([self.sock], [], [], timeout)
            except InterruptedError:
                return
            if not ready:
                return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            raise RankZeroGone()
        self.expected += len(data)


class Session:
    """The MPI world as mpimap uses it: a private communicator, node map and lifelines.

    Collective: every rank of COMM_WORLD constructs it at the same point.
    """

    def __init__(self, world=None):
        world = MPI.COMM_WORLD if world is None else world
        self.comm = world.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.node_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        leader = self.node_comm.bcast(self.rank, root=0)
        # One receiver per node for large broadcasts: rank 0 (the first rank of its node, as
        # Split_type keeps the order of ranks) and the first rank of every other node.
        first = self.node_comm.Get_rank() == 0
        leaders = self.comm.Split(0 if first else MPI.UNDEFINED, self.rank)
        self.leaders = leaders if first else None
        local = self.node_comm.allgather(self.rank)
        self.share = _nodeshare.NodeShare(self.comm, self.node_comm, self.leaders, local)
        host = socket.gethostname()
        node = os.environ.get("SLURMD_NODENAME") or host
        mine = (self.rank, host, node, os.getpid(), leader)
        table = self.comm.allgather(mine)
        self.info = {r: WorkerInfo(r, h, n, p) for r, h, n, p, _l in table}
        self.node_leader = {r: l for r, _h, _n, _p, l in table}
        self.lifelines: dict[int, socket.socket] = {}
        if self.size > 1:
            self._open_lifelines()

    def _open_lifelines(self) -> None:
        """Every worker connects to rank 0: a Unix socket on rank 0's host, TCP from elsewhere."""
        enabled = knob("MPIMAP_LIFELINE")
        host = socket.gethostname()
        if self.rank == 0:
            servers = []
            offer = None
            if enabled:
                token = secrets.token_bytes(16)
                unix_name = None
                try:  # Linux abstract namespace: no file to clean up, cheaper than TCP
                    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    unix_name = "\0mpimap-" + token.hex()
                    unix.bind(unix_name)
                    unix.listen(min(self.size, 4096))
                    servers.append(unix)
                except OSError:
                    unix_name = None
                try:
                    tcp = socket.create_server(("", 0), backlog=min(self.size, 4096))
                    servers.append(tcp)
                    port = tcp.getsockname()[1]
                except OSError as exc:
                    port = None
                    print(f"mpimap: cannot open a TCP lifeline listener ({exc}); ranks on "
                          f"other nodes will poll", file=sys.stderr)
                if servers:
                    offer = (_addresses(), port, token, host, unix_name)
            offer = self.comm.bcast(offer, root=0)
            if not servers:
                self.comm.Ibarrier().Wait()
                self.comm.bcast([], root=0)
                return
            pending = self.comm.Ibarrier()
            for srv in servers:
                srv.setblocking(False)
            conns = []
            done = False
            while True:
                ready, _w, _x = select.select(servers, [], [], 0.001)
                for srv in ready:
                    try:
                        conns.append(srv.accept()[0])
                    except BlockingIOError:
                        pass
                if ready:
                    continue
                if done:
                    break
                done = pending.Test()
            ok = []
            for conn in conns:
                conn.setblocking(True)
                conn.settimeout(5)
                try:
                    rank, tok = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
                except (OSError, struct.error):
                    conn.close()
                    continue
                if tok != token or not 0 < rank < self.size or rank in self.lifelines:
                    conn.close()
                    continue
                conn.settimeout(None)
                _nodelay(conn)
                self.lifelines[rank] = conn
                ok.append(rank)
            for srv in servers:
                srv.close()
            self.comm.bcast(ok, root=0)
        else:
            offer = self.comm.bcast(None, root=0)
            sock = None
            if offer is not None:
                addrs, port, token, host0, unix_name = offer
                if unix_name and host == host0:
                    try:
                        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        sock.connect(unix_name)
                    except OSError:
                        sock.close()
                        sock = None
                if sock is None and port is not None:
                    sock = _connect(addrs, port, knob("MPIMAP_CONNECT_TIMEOUT"))
                if sock is not None:
                    try:
                        sock.sendall(_HELLO.pack(self.rank, token))
                    except OSError:
                        sock.close()
                        sock = None
            # Non-blocking and blocking collectives never match: rank 0 uses Ibarrier.
            self.comm.Ibarrier().Wait()
            ok = self.comm.bcast(None, root=0)
            if sock is not None:
                if self.rank in ok:
                    _nodelay(sock)
                    sock.setblocking(False)
                    self.lifelines[0] = sock
                else:
                    sock.close()

    def finalize(self, clean: bool) -> None:
        """Free our communicators (only when every rank is alive and done)."""
        self.share.close(timeout=2.0 if clean else 0.0)
        for s in self.lifelines.values():
            try:
                s.close()
            except OSError:
                pass
        self.lifelines.clear()
        if clean:
            try:
                if self.leaders is not None:
                    self.leaders.Free()
                self.node_comm.Free()
                self.comm.Free()
            except MPI.Exception:
                pass


def _ring(sock) -> bool:
    """One doorbell byte; False if the peer is gone. Never blocks: if the peer has let its
    buffer fill it is awake and reading anyway (and nobody sleeps more than 1 s)."""
    try:
        sock.send(b"\0")
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def _nodelay(sock):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError(errno.ECONNRESET, "closed")
        data += chunk
    return data


def _addresses():
    """Addresses other nodes may reach this host by: its names and their IPv4 addresses."""
    names = [socket.getfqdn(), socket.gethostname()]
    out = []
    for name in names:
        if name not in out:
            out.append(name)
        try:
            for info in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM):
                addr = info[4][0]
                if addr not in out and not addr.startswith("127."):
                    out.append(addr)
        except OSError:
            pass
    return out


def _connect(addrs, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for addr in addrs:
            try:
                return socket.create_connection((addr, port), timeout=min(2.0, timeout))
            except OSError:
                continue
        time.sleep(0.2)
    return None


def world_size() -> int:
    return MPI.COMM_WORLD.Get_size()


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def abort(code: int) -> None:
    MPI.COMM_WORLD.Abort(code)


def finalize_mpi() -> None:
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def library() -> str:
    return MPI.Get_library_version().splitlines()[0].strip()
