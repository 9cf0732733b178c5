"""Getting a bundle to every node, and task outputs back: the protocol on both sides.

    rank 0 (EngineBundles)                                   one stager per node (WorkerBundles)
    prepare(): files= + modules= + detected imports
        -> _bundle.Builder: id (hashing only files its index does not know); already
           published on rank 0's node, or to be published there during the transfer
    ensure(): stagers not yet known to hold the id:
        BUNDLE query(id) ───────────────────────────────────▶ published here and intact?
            (rank 0's own node: once rank 0 has published there -- normally a hit)
        ◀── REPLY bundle have / path ─────────────────────────┘ (hit: nothing is sent)
        misses: BUNDLE begin(manifest) ─────────────────────▶ Receiver: validate entries
                BUNDLE data × n (<= MPIMAP_BUNDLE_PIECE) ───▶ write + sha256 as they arrive
                (the same pieces feed rank 0's own Receiver: all nodes write at once)
                BUNDLE end ─────────────────────────────────▶ verify, publish (rename)
        ◀── REPLY bundle staged / bad files / error ──────────┘
        checksum mismatch: send again once, then BundleError naming the file and the node
    use(): every worker whose bundle changed:
        BUNDLE use(id, path on its node) ───────────────────▶ every rank: shared lock (purge
                                                              skips it), stamp, modules/ on
                                                              sys.path -- before the function
                                                              (which may import them) is loaded
    TASK spec["bundle"] ────────────────────────────────────▶ per-rank working dir (_workdir)
    ◀── RESULT + outputs (path, item, bytes) ─────────────────┘
    write_outputs(): under rank 0's cwd; two items writing one path -> BundleError naming both

A node is ``Split_type(COMM_TYPE_SHARED)`` (``Session.node_leader``; the in-process transport
groups by node name). Its stager is its lowest worker rank -- rank 0 never stages for others, so
rank 0's own node goes through the same path: its stager asks its cache, which normally holds
the bundle already because rank 0 published it there (a hit, nothing sent). If the stager's cache
is elsewhere (another MPIMAP_CACHE_DIR), the bundle simply travels over MPI like to any other
node: no filesystem is ever shared between rank 0 and a node.

Rank 0 remembers which stager holds which id, so the second map with the same files sends
nothing and asks nothing. Staging is synchronous in ``Engine.start``: every node has its copy
before the first chunk, and a bad path, an unsafe entry, a checksum failure or a full disk is an
error before any task runs.
"""

from __future__ import annotations

import os
import sys

from . import _bundle, _cache, _modules, _workdir
from ._env import knob
from ._errors import BundleError, MpimapError
from ._serial import Packed
from ._transport import BUNDLE, REPLY, Frame

__all__ = ["EngineBundles", "WorkerBundles"]

RAW = -1  # codec of a Packed that is plain bytes
_BIG_DETECTED = 64 << 20  # detected local packages bigger than this are announced


class _Outputs:
    __slots__ = ("cwd", "names", "clash")

    def __init__(self, cwd):
        self.cwd = cwd
        self.names: dict = {}  # relative path -> item
        self.clash = None


class EngineBundles:
    """Rank 0's side."""

    def __init__(self, engine):
        self.engine = engine
        self.builder = None
        self.holds: dict = {}  # stager rank -> {id: path on its node}
        self.active: dict = {}  # worker rank -> bundle id it uses
        self.log: list = []  # one record per staging round (tests, benchmarks)
        self.outputs: dict = {}  # job id -> _Outputs (kept a while after the map ends)
        self.req = 0
        self.warned = 0

    # -- building -----------------------------------------------------------------------------

    def prepare(self, files=None, modules=None, detected=()) -> _bundle.Bundle | None:
        """The bundle a map needs, published on rank 0's node; None if it needs none."""
        cwd = os.getcwd()
        skip = []
        if files is not None:
            for fn in (_cache.cache_root, _cache.scratch_root):
                try:
                    skip.append(os.path.realpath(fn()))
                except MpimapError:
                    pass
        entries = _bundle.resolve_files(files, cwd, tuple(skip))
        mods, explicit = _modules.resolve(modules)
        found = {top: (kind, path) for top, kind, path in mods}
        for top, kind, path in detected:
            found.setdefault(top, (kind, path))
        if not entries and not found:
            return None
        records = [{"name": top, "kind": kind, "source": path, "detected": top not in explicit}
                   for top, (kind, path) in sorted(found.items())]
        mod_entries = _bundle.module_entries([(t, k, p) for t, (k, p) in sorted(found.items())])
        auto = sum(e.size for e in mod_entries if e.path.split("/")[1].split(".")[0]
                   not in explicit)
        if auto > _BIG_DETECTED and auto != self.warned:
            self.warned = auto
            print(f"mpimap: shipping {_cache.human(auto)} of local modules detected from the "
                  f"function's imports ({', '.join(t for t in found if t not in explicit)}). "
                  f"Pass modules= yourself, or set MPIMAP_AUTO_MODULES=0, to choose what goes.",
                  file=sys.stderr)
        entries += mod_entries
        if self.builder is None:
            self.builder = _bundle.Builder()
        spec = [] if files is None else [os.fspath(f) for f in
                                        ([files] if isinstance(files, (str, os.PathLike))
                                         else files)]
        return self.builder.build(entries, spec, records,
                                  sorted(t for t in found if t not in explicit))

    # -- nodes --------------------------------------------------------------------------------

    def _groups(self) -> dict:
        hub = self.engine.hub
        session = getattr(hub, "session", None)
        leader = getattr(session, "node_leader", None)
        groups: dict = {}
        for w in self.engine.live:
            key = leader[w.rank] if leader else w.info.node
            groups.setdefault(key, []).append(w.rank)
        return groups

    def _ask(self, ranks, make_meta) -> dict:
        """Send a BUNDLE frame to each rank and wait for its reply; {rank: reply or None}."""
        self.req += 1
        req = self.req
        waiting = set()
        for r in ranks:
            self.engine.hub.send(r, Frame(BUNDLE, dict(make_meta(r), req=req)))
            waiting.add(r)
        return self._wait(waiting, req)

    def _wait(self, waiting: set, req: int) -> dict:
        got: dict = {}
        while waiting:
            self.engine.progress(1.0)
            for rank, meta in self.engine._take_replies("bundle"):
                if meta.get("req") == req and rank in waiting:
                    waiting.discard(rank)
                    got[rank] = meta
            for r in list(waiting):
                if not self.engine.workers[r].alive:
                    waiting.discard(r)
                    got[r] = None
        return got

    def _rank0_group(self, groups):
        """The key of the node group rank 0 sits on, if it has workers."""
        session = getattr(self.engine.hub, "session", None)
        leader = getattr(session, "node_leader", None)
        key = leader[0] if leader else _cache.node_name()
        return key if key in groups else None

    def ensure(self, bundle: _bundle.Bundle) -> dict:
        """Every node with live workers holds ``bundle``; returns {stager: path}.

        Rank 0's own node is asked only once rank 0 has published the bundle there (normally a
        hit, so nothing travels to it); the other nodes are asked at once, and the pieces for
        those that miss it are the pieces rank 0 publishes from.
        """
        info = self.engine.hub.info
        record = {"id": bundle.id, "nodes": {}}
        sent_to: dict = {}
        attempts: dict = {}
        while True:
            groups = self._groups()
            stagers = {min(ranks): key for key, ranks in groups.items()}
            todo = [s for s in stagers if bundle.id not in self.holds.get(s, {})]
            for s in stagers:
                if s not in todo:  # known from an earlier map: neither asked nor sent
                    record["nodes"].setdefault(info[s].node, {"stager": s, "hit": True,
                                                              "sent": 0, "asked": False})
            local = bundle.path is None
            mine = self._rank0_group(groups) if local else None
            ask = [s for s in todo if stagers[s] != mine or mine is None]
            if not ask and not local:
                break
            asked = self._ask(ask, lambda r: {"op": "query", "id": bundle.id}) if ask else {}
            misses = []
            for r, meta in asked.items():
                if meta is None:
                    continue  # lost: the next round picks another stager for that node
                if meta.get("error"):
                    raise BundleError(f"node {info[r].node} (rank {r}): {meta['error']}")
                if meta.get("have"):
                    self.holds.setdefault(r, {})[bundle.id] = meta["path"]
                    record["nodes"].setdefault(info[r].node, {"stager": r, "hit": True,
                                                              "sent": sent_to.get(r, 0)})
                else:
                    misses.append(r)
            while misses or local:
                for r in misses:
                    attempts[r] = attempts.get(r, 0) + 1
                req, sent = self._transfer(misses, bundle, local)
                local = False
                for r in misses:
                    sent_to[r] = sent_to.get(r, 0) + sent
                replies = self._wait(set(misses), req) if misses else {}
                misses = []
                for r, meta in replies.items():
                    node = info[r].node
                    if meta is None:
                        continue
                    if meta.get("error"):
                        raise BundleError(f"node {node} (rank {r}): {meta['error']}")
                    if meta.get("bad"):
                        if attempts[r] < 2:
                            misses.append(r)  # damaged in transit: that node re-receives
                            continue
                        bad = meta["bad"]
                        raise BundleError(
                            f"{_shown(bad[0])}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}"
                            f" of bundle {bundle.id[:12]} failed its sha256 check on node {node} "
                            f"(rank {r}) twice: the bytes were damaged on the way or on that "
                            f"node's disk ({meta.get('root', 'its cache')}). Check the node, or "
                            f"set MPIMAP_CACHE_DIR to another node-local directory.")
                    self.holds.setdefault(r, {})[bundle.id] = meta["path"]
                    record["nodes"][node] = {"stager": r, "hit": False, "sent": sent_to[r],
                                             "attempts": attempts[r]}
        self.log.append(record)
        return {s: self.holds[s][bundle.id] for s in self.holds if bundle.id in self.holds[s]}

    def _transfer(self, ranks, bundle, local: bool) -> tuple[int, int]:
        """Send ``bundle`` to the stagers ``ranks`` and, with ``local``, publish it on rank 0's
        node from the same pieces. At most a few pieces per stager are in flight."""
        hub = self.engine.hub
        self.req += 1
        req = self.req
        man = dict(bundle.manifest)
        origin = {"from_rank": 0, "from_node": _cache.node_name()}
        for r in ranks:
            hub.send(r, Frame(BUNDLE, {"op": "begin", "id": bundle.id, "manifest": man,
                                       "origin": dict(origin, rank=r, node=hub.info[r].node)}))
        rec = self.builder.local_receiver(bundle) if local else None
        # MPIHub keeps a list of posted, unfinished sends (two entries per data frame); the
        # in-process transport copies at once (no list: every buffer is free again).
        limit = 8 + 8 * len(ranks)

        def in_use():
            return {id(getattr(b, "obj", b)) for _r, b in getattr(hub, "pending", ())}

        sent = 0
        try:
            for piece in _bundle.pieces(bundle, knob("MPIMAP_BUNDLE_PIECE"), busy=in_use):
                packed = Packed(RAW, piece, [])
                for r in ranks:
                    hub.send(r, Frame(BUNDLE, {"op": "data", "id": bundle.id}, [packed]))
                if rec is not None:
                    rec.feed(piece)
                sent += piece.nbytes
                while len(getattr(hub, "pending", ())) > limit:
                    self.engine.progress(0.001)
        except BaseException:
            for r in ranks:
                hub.send(r, Frame(BUNDLE, {"op": "abort", "id": bundle.id}))
            if rec is not None:
                rec.abort()
            raise
        for r in ranks:
            hub.send(r, Frame(BUNDLE, {"op": "end", "id": bundle.id, "req": req}))
        if rec is not None:
            self.builder.finish_local(bundle, rec)
        return req, sent

    def use(self, bundle: _bundle.Bundle) -> None:
        """Tell every worker whose bundle changed where this one is on its node."""
        groups = self._groups()
        for ranks in groups.values():
            stager = min(ranks)
            path = self.holds[stager][bundle.id]
            for r in ranks:
                if self.active.get(r) != bundle.id:
                    self.engine.hub.send(r, Frame(BUNDLE, {
                        "op": "use", "id": bundle.id, "path": path,
                        "modules_key": bundle.modules_key}))
                    self.active[r] = bundle.id

    def stage(self, bundle: _bundle.Bundle) -> None:
        self.ensure(bundle)
        self.use(bundle)

    def lost(self, rank) -> None:
        self.holds.pop(rank, None)
        self.active.pop(rank, None)

    # -- outputs ------------------------------------------------------------------------------

    def open_job(self, jid) -> None:
        self.outputs[jid] = _Outputs(os.getcwd())
        while len(self.outputs) > 64:
            self.outputs.pop(next(iter(self.outputs)))

    def write_outputs(self, jid, rank, records, buffers) -> BundleError | None:
        """Write a chunk's output files under rank 0's cwd (of the map's start); a clash keeps
        both copies and is returned as an error naming both items."""
        out = self.outputs.get(jid)
        if out is None:
            out = self.outputs[jid] = _Outputs(os.getcwd())
        where = self.engine.workers[rank].where
        it = iter(buffers)
        error = None
        for rel, item, kind, mode, target, has in records:
            data = next(it).data if has else None
            if not rel or os.path.isabs(rel) or rel.split("/")[0] == ".." or \
                    ".." in rel.split("/"):
                error = error or BundleError(f"item {item} on {where} created {rel!r}, a path "
                                             f"outside the working directory; not written")
                continue
            dest = os.path.join(out.cwd, *rel.split("/"))
            first = out.names.get(rel)
            if first is not None and kind != "dir":
                keep = f"{dest}.mpimap-item{item}"
                error = error or BundleError(
                    f"items {first} and {item} both created {rel!r} in their working directory: "
                    f"item {first}'s file is {dest}, item {item}'s was saved as {keep}. Give "
                    f"each task's output its own name (e.g. with mpimap.task().index).")
                dest = keep
            else:
                out.names[rel] = item
            try:
                _write(dest, kind, mode, target, data)
            except OSError as exc:
                error = error or BundleError(f"cannot write {dest}, created by item {item} on "
                                             f"{where}: {exc}")
        return error


def _shown(path: str) -> str:
    return path[6:] if path.startswith("files/") else path


def _write(dest, kind, mode, target, data):
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    if kind == "dir":
        os.makedirs(dest, exist_ok=True)
        return
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.mpimap-{os.getpid()}.tmp")
    if kind == "link":
        os.symlink(target, tmp)
    else:
        with open(tmp, "wb") as fh:
            if data is not None:
                fh.write(data)
        os.chmod(tmp, mode or 0o644)
    os.replace(tmp, dest)  # no half-written files under the user's names


# ----------------------------------------------------------------------------------------------
# A worker's side

class _Handle:
    __slots__ = ("id", "path", "fd", "modules")

    def __init__(self, bid, path, fd):
        self.id = bid
        self.path = path
        self.fd = fd
        self.modules = os.path.join(path, "modules")


class WorkerBundles:
    def __init__(self, worker):
        self.worker = worker
        self.ep = worker.ep
        self.node = self.ep.info.node
        self.receiving: dict = {}
        self.verified: dict = {}  # id -> path checked by this process
        self.handles: dict = {}  # id -> _Handle (locked while this process lives)
        self.errors: dict = {}  # id -> why "use" failed on this rank
        self.modules = None  # (modules_key, path on sys.path)

    def _reply(self, meta, **fields):
        self.ep.send(Frame(REPLY, dict(what="bundle", req=meta.get("req"), id=meta["id"],
                                       **fields)))

    def handle(self, frame) -> None:
        meta = frame.meta
        op = meta["op"]
        if op == "query":
            try:
                root = _cache.cache_root(self.node)
                path = self._published(root, meta["id"])
            except MpimapError as exc:
                self._reply(meta, error=str(exc))
                return
            if path is not None:
                _cache.touch(root, meta["id"])
            self._reply(meta, have=path is not None, path=path)
        elif op == "abort":
            rec = self.receiving.pop(meta["id"], None)
            if isinstance(rec, _bundle.Receiver):
                rec.abort()
        elif op == "begin":
            old = self.receiving.pop(meta["id"], None)
            if isinstance(old, _bundle.Receiver):
                old.abort()
            try:
                root = _cache.cache_root(self.node)
            except MpimapError as exc:
                self.receiving[meta["id"]] = exc
                return
            self.receiving[meta["id"]] = _bundle.Receiver(root, meta["id"], meta["manifest"],
                                                          meta["origin"])
        elif op == "data":
            rec = self.receiving.get(meta["id"])
            if isinstance(rec, _bundle.Receiver):
                rec.feed(frame.payloads[0].data)
        elif op == "end":
            rec = self.receiving.pop(meta["id"], None)
            if not isinstance(rec, _bundle.Receiver):
                self._reply(meta, error=str(rec or "the bundle's first piece never arrived"))
                return
            path, bad, error = rec.finish()
            if error is not None:
                self._reply(meta, error=str(error))
            elif bad:
                self._reply(meta, bad=bad, root=rec.root)
            else:
                self.verified[meta["id"]] = path
                self._reply(meta, path=path, received=rec.received)
        elif op == "use":
            self._use(meta)

    def _published(self, root, bid):
        if bid in self.verified:
            return self.verified[bid]
        path = _cache.bundle_dir(root, bid)
        if not os.path.isdir(path):
            return None
        why = _bundle.verify_published(path, bid)
        if why is not None:
            print(f"mpimap: node {self.node}: cached bundle {bid[:12]} is damaged ({why}); "
                  f"receiving it again", file=sys.stderr)
            _cache.discard(root, bid)
            return None
        self.verified[bid] = path
        return path

    def _use(self, meta) -> None:
        bid, path = meta["id"], meta["path"]
        self.errors.pop(bid, None)
        handle = self.handles.get(bid)
        if handle is None or handle.path != path:
            fd = _cache.lock_shared(path)
            if fd is None:
                self.errors[bid] = (f"bundle {bid[:12]} is not at {path} on rank "
                                    f"{self.ep.rank} (node {self.node}), where its node's stager "
                                    f"published it. The ranks of one node must see the same "
                                    f"MPIMAP_CACHE_DIR.")
                return
            handle = self.handles[bid] = _Handle(bid, path, fd)
            self._trim(keep=bid)
        _cache.touch(os.path.dirname(os.path.dirname(os.path.dirname(path))), bid)
        key = meta.get("modules_key") or ""
        if key:
            self._activate_modules(key, handle.modules)

    def _trim(self, keep, most=16) -> None:
        """Let go of bundles this rank no longer uses (purge may then remove them)."""
        if len(self.handles) <= most:
            return
        busy = {keep} | {(j.bundle or {}).get("id") for j in self.worker.jobs.values()}
        if self.modules is not None:
            busy |= {h.id for h in self.handles.values() if h.modules == self.modules[1]}
        for bid in [b for b in self.handles if b not in busy][:len(self.handles) - most]:
            os.close(self.handles.pop(bid).fd)

    def _activate_modules(self, key, path) -> None:
        """Put this bundle's modules/ first on sys.path. If the modules changed since the last
        bundle, forget the ones imported from there, so the next import reads the new code."""
        old = self.modules
        if old is not None and old[1] != path:
            while old[1] in sys.path:
                sys.path.remove(old[1])
            if old[0] != key:
                prefix = old[1] + os.sep
                for name, mod in list(sys.modules.items()):
                    f = getattr(mod, "__file__", None)
                    if isinstance(f, str) and f.startswith(prefix):
                        del sys.modules[name]
        if path not in sys.path:
            sys.path.insert(0, path)
        import importlib

        importlib.invalidate_caches()
        self.modules = (key, path)

    def job_dirs(self, jid, spec) -> _workdir.JobDirs:
        """The directories of a map on this rank; raises BundleError if its bundle is missing."""
        bid = spec["id"] if spec else None
        path = None
        if bid is not None:
            if bid in self.errors:
                raise BundleError(self.errors[bid])
            handle = self.handles.get(bid)
            if handle is None:
                raise BundleError(f"bundle {bid[:12]} never reached rank {self.ep.rank} (node "
                                  f"{self.node})")
            path = handle.path if spec.get("files") else None
        return _workdir.JobDirs(self.ep.rank, jid, self.node, path, spec.get("top", ()) if
                                spec else (), bid or "")

