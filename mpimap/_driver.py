"""Rank 0's loop behind pmap / imap / Pool.map. Talks to a Hub (``_transport``), never to mpi4py.

Data flow of one map:

    func ──fingerprint──▶ code cache hit? ──no──▶ dill once ──▶ object id F
    common ─────────────────────────────────────▶ pickle-5 once ──▶ object id C
                  (objects >= MPIMAP_BCAST_MIN are broadcast to every worker at the start,
                   their large arrays once per node into shared memory (``_nodeshare``);
                   smaller ones ride along with a worker's first chunk of the map)
    input ──ItemSource.take(n)──▶ TASK(job, chunk, start, items) ──▶ the least-loaded worker
                                   n from ChunkPlanner; a worker holds <= depth chunks
    RESULT(job, chunk, results, errors, seconds) ──▶ planner timing; reorder buffer (ordered)
         first error with errors="raise": CANCEL to workers holding chunks, raise on rank 0
    lost worker (lifeline closed) ──▶ WorkerLostError naming the rank, host and items it held
    end of map: DROP per-map objects and forget the job on the workers that saw it

    files= / modules= / local imports the function makes (_stage, before anything is placed):
        bundle built or found on rank 0's node ──▶ one stager per node: query; send on a miss
        ──▶ every worker: BUNDLE use (modules on sys.path before the function loads)
        ──▶ TASK spec["bundle"]: tasks run in a per-rank working directory
        RESULT outputs (files tasks created) ──▶ written under rank 0's cwd, even for a
        cancelled map; two items creating one path ──▶ BundleError naming both

With ``checkpoint=`` (see ``_checkpoint``) the input goes through the checkpoint's source, which
takes finished items out and hands them back as ready chunks (in order, never sent to a worker);
every RESULT is also recorded in the checkpoint; a stop signal makes ``fill`` hand out nothing more,
cancel queued chunks and wait (at most MPIMAP_CHECKPOINT_GRACE) for running ones; ``finish``
writes the checkpoint.

Several maps can be open at once (two imap generators consumed in turn): results are routed by job
id, and chunks of a cancelled map that were already running come back and are dropped.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

from . import _serial
from ._env import knob
from ._errors import (BundleError, MpimapError, RemoteError, SerializationError,
                      WorkerLostError, attach_remote)
from ._schedule import ChunkPlanner, ItemSource
from ._transport import (CANCEL, DROP, POOL, PUT, RELEASE, REPLY, RESULT, SHUTDOWN, TASK, Frame)

__all__ = ["Engine", "format_items"]


def format_items(items) -> str:
    """'3, 7-9, 12' for a sorted list of indices."""
    items = sorted(items)
    parts = []
    for _key, group in itertools.groupby(enumerate(items), lambda p: p[1] - p[0]):
        run = [v for _i, v in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(parts)


class _WorkerState:
    __slots__ = ("rank", "info", "alive", "stopped", "inflight", "objects", "jobs", "forget")

    def __init__(self, rank, info):
        self.rank = rank
        self.info = info
        self.alive = True
        self.stopped = False
        self.inflight: dict = {}  # (job, chunk) -> (start, n)
        self.objects: set = set()
        self.jobs: set = set()
        self.forget: list = []

    @property
    def where(self):
        return f"rank {self.rank} ({self.info.host})"


class _Object:
    __slots__ = ("id", "packed", "role", "what", "job", "per_item", "detected", "modules_key")

    def __init__(self, oid, packed, role, what, job=None):
        self.id = oid
        self.packed = packed
        self.role = role
        self.what = what
        self.job = job
        self.per_item = None  # code: seconds per item measured in its last map
        self.detected = None  # code: local modules it imports (_modules.detect), once
        self.modules_key = None  # code: the shipped modules it was loaded with


class Job:
    """One map in flight on rank 0."""

    def __init__(self, engine, jid, spec, source, planner, ordered, fail_fast, progress,
                 read_ahead, objects):
        self.engine = engine
        self.id = jid
        self.spec = spec
        self.source = source
        self.planner = planner
        self.ordered = ordered
        self.fail_fast = fail_fast
        self.progress = progress
        self.read_ahead = read_ahead
        self.objects = objects  # per-map object ids, dropped at the end
        self.next_chunk = 0
        self.outstanding: dict = {}  # chunk -> (rank, start, n)
        self.ready: dict = {}  # chunk -> list of results (ordered) ...
        self.ready_order: list = []  # ... or arrival order (unordered)
        self.next_out = 0
        self.items_out = 0
        self.items_done = 0
        self.failure: BaseException | None = None
        self.closed = False
        self.ranks_seen: set = set()
        self.scratch_ranks: set = set()
        self.checkpoint = None  # _checkpoint.MapCheckpoint
        self.stop_by = None     # after a stop signal: when to stop waiting for running chunks

    @property
    def complete(self) -> bool:
        return self.source.exhausted and not self.outstanding

    def pending_items(self) -> int:
        return self.source.taken - self.items_out


class Engine:
    """Rank 0's side: the worker table, objects held by workers, open maps."""

    def __init__(self, hub, collective: bool = False):
        self.hub = hub
        self.collective = collective
        self.workers = {r: _WorkerState(r, hub.info[r]) for r in hub.ranks}
        self.jobs: dict[int, Job] = {}
        self.objects: dict[int, _Object] = {}
        self.code_cache: OrderedDict = OrderedDict()  # (bytes, small) -> [(fingerprint, oid)]
        self._ids = itertools.count(1)
        self.replies: list = []
        self.closed = False
        # Knobs are read once, when the engine starts (they sit on the hot path of every map).
        self.cfg = {name: knob(name) for name in (
            "MPIMAP_CODE_CACHE", "MPIMAP_BCAST_MIN", "MPIMAP_CHUNK_SECONDS", "MPIMAP_PREFETCH",
            "MPIMAP_READ_AHEAD", "MPIMAP_SPIN", "MPIMAP_AUTO_MODULES", "MPIMAP_SHARE_MIN")}
        self.pool_code: dict[int, set] = {}  # pool id -> large functions its maps used
        self._bundles = None

    @property
    def bundles(self):
        """files=/modules= staging and task outputs (_stage), made on first use."""
        if self._bundles is None:
            from ._stage import EngineBundles

            self._bundles = EngineBundles(self)
        return self._bundles

    def _bundle_for(self, funcs, code, cached, files, modules):
        """The bundle a map (or a pool's initializer) needs, staged on every node; or None."""
        detected = ()
        if self.cfg["MPIMAP_AUTO_MODULES"]:
            from ._modules import detect

            if code is None:
                detected = detect(funcs)
            else:
                if not cached or code.detected is None:
                    code.detected = detect(funcs)
                detected = code.detected
        if files is None and modules is None and not detected:
            return None
        bundle = self.bundles.prepare(files, modules, detected)
        if bundle is not None:
            self.bundles.stage(bundle)
        return bundle

    # -- workers ---------------------------------------------------------------------------------

    @property
    def live(self):
        return [w for w in self.workers.values() if w.alive]

    @property
    def nworkers(self) -> int:
        return len(self.live)

    def _require_workers(self):
        if not self.live:
            raise WorkerLostError("no worker ranks are left: every worker of this run has died; "
                                  "see the earlier WorkerLostError for the first one")

    # -- objects on workers ------------------------------------------------------------------------

    def _new_object(self, packed, role, what, job=None) -> _Object:
        obj = _Object(next(self._ids), packed, role, what, job)
        self.objects[obj.id] = obj
        return obj

    def code_object(self, func, what) -> tuple[_Object, bool]:
        """Object id for ``func``; reuses the one on the workers if func has not changed.

        Change detection: ``_serial.fingerprint`` re-pickles the function's code identity, its
        closure, defaults and the globals it reads (recursively through script-level helpers) --
        microseconds -- and compares. Big captured arrays are compared by identity.
        Returns (object, cached).
        """
        fp = _serial.fingerprint(func)
        if fp is not None:
            key = (fp[0], fp[1])
            for other_fp, oid in self.code_cache.get(key, ()):
                if _serial.same_fingerprint(fp, other_fp) and oid in self.objects:
                    self.code_cache.move_to_end(key)
                    return self.objects[oid], True
        obj = self._new_object(_serial.dumps_code(func, what), "code", what)
        if fp is None:
            obj.job = "once"
            return obj, False
        self.code_cache.setdefault((fp[0], fp[1]), []).append((fp, obj.id))
        self.code_cache.move_to_end((fp[0], fp[1]))
        capacity = self.cfg["MPIMAP_CODE_CACHE"]
        while sum(len(v) for v in self.code_cache.values()) > capacity:
            _key, entries = self.code_cache.popitem(last=False)
            for _fp, oid in entries:
                self._drop_everywhere(oid, now=False)
        return obj, False

    def data_object(self, value, role, what, job=None) -> _Object:
        try:
            packed = _serial.dumps_data(value, to_worker=True)
        except Exception as exc:
            raise SerializationError(_serial._explain_dumps_failure(value, what, exc)) from exc
        return self._new_object(packed, role, what, job)

    def _place(self, obj: _Object):
        """Broadcast a big object to every live worker now; small ones go with first chunks."""
        if obj.packed.nbytes < self.cfg["MPIMAP_BCAST_MIN"]:
            return
        ranks = [w.rank for w in self.live if obj.id not in w.objects]
        if not ranks:
            return
        frame = Frame(PUT, {"puts": [(obj.id, obj.role, obj.what)]}, [obj.packed])
        # common: node-shared pages mapped read-only; code: copy-on-write (captured arrays stay
        # writable, privately, as they would be in a process of its own)
        self.hub.bcast(ranks, frame, readonly=obj.role == "common")
        for r in ranks:
            self.workers[r].objects.add(obj.id)

    def _drop_everywhere(self, oid, now: bool):
        self.objects.pop(oid, None)
        for w in self.live:
            if oid in w.objects:
                w.objects.discard(oid)
                if now:
                    self.hub.send(w.rank, Frame(DROP, {"drop": [oid]}))
                else:
                    w.forget.append(("drop", oid))

    # -- pools -------------------------------------------------------------------------------------

    def open_pool(self, common, initializer, initargs, has_common: bool):
        """Register a pool: its common data, and its initializer run once on every worker."""
        self._require_workers()
        pid = next(self._ids)
        common_obj = None
        if has_common:
            common_obj = self.data_object(common, "common", "the Pool's common data")
            self._place(common_obj)
        if initializer is not None:
            self._bundle_for([initializer], None, False, None, None)
            init = self._new_object(_serial.dumps_code((initializer, tuple(initargs)),
                                                       "the Pool initializer"),
                                    "code", "the Pool initializer")
            ranks = [w.rank for w in self.live]
            frame = Frame(POOL, {"pool": pid, "init": init.id,
                                 "puts": [(init.id, "code", init.what)]}, [init.packed])
            self.hub.bcast(ranks, frame)
            self.objects.pop(init.id, None)
            waiting = set(ranks)
            errors = []
            while waiting:
                self.progress(1.0)
                for rank, meta in self._take_replies("pool"):
                    if meta.get("pool") == pid:
                        waiting.discard(rank)
                        if not meta["ok"]:
                            errors.append(meta["error"])
                waiting &= {w.rank for w in self.live}
            if errors:
                self.close_pool(pid, common_obj)
                raise MpimapError(f"{errors[0]}")
        return pid, common_obj

    def close_pool(self, pid, common_obj):
        """Free the pool's common data and the large functions its maps used, now: the DROP
        also carries the finished maps the workers still remember (they hold the data too)."""
        drop = set(self.pool_code.pop(pid, ()))
        if common_obj is not None:
            drop.add(common_obj.id)
        for job in self.jobs.values():  # a map of the pool still open: it frees them at its end
            job.objects.extend(oid for oid in (job.spec["func"], job.spec["common"])
                               if oid in drop and oid not in job.objects)
        drop -= self._still_needed()
        for oid in drop:
            self.objects.pop(oid, None)
        for w in self.live:
            w.forget.append(("pool", pid))
            for oid in drop & w.objects:
                w.objects.discard(oid)
                w.forget.append(("drop", oid))
            meta = {}
            self._attach_forget(w, meta)
            self.hub.send(w.rank, Frame(DROP, meta))

    def _still_needed(self) -> set:
        """Objects an open map or an open pool still uses."""
        used = {oid for j in self.jobs.values() for oid in (j.spec["func"], j.spec["common"])}
        return used.union(*self.pool_code.values())

    def _take_replies(self, what):
        mine = [(r, m) for r, m in self.replies if m.get("what") == what]
        self.replies = [(r, m) for r, m in self.replies if m.get("what") != what]
        return mine

    # -- maps --------------------------------------------------------------------------------------

    def start(self, func, iterables, *, common_obj=None, per_map_common=None,
              has_common=False, pool=None, chunksize=None, ordered=True, errors="raise",
              progress=False, seed=None, lazy=False, files=None, modules=None,
              checkpoint=None) -> Job:
        self._require_workers()
        source = ItemSource(iterables)
        jid = next(self._ids)
        func_obj, cached = self.code_object(func, _what_func(func))
        # Before anything is placed on the workers: the function may import shipped modules.
        bundle = self._bundle_for([func], func_obj, cached, files, modules)
        if bundle is not None and bundle.modules_key:
            if cached and func_obj.modules_key not in (None, bundle.modules_key):
                # The copy on the workers was loaded with other versions of those modules.
                detected = func_obj.detected
                self._drop_everywhere(func_obj.id, now=False)
                func_obj, cached = self.code_object(func, _what_func(func))
                func_obj.detected = detected
            func_obj.modules_key = bundle.modules_key
        per_map = []
        if func_obj.job == "once":
            per_map.append(func_obj.id)
        elif func_obj.packed.nbytes >= self.cfg["MPIMAP_SHARE_MIN"]:
            # A function carrying large arrays is not kept in the code cache for later: its
            # memory is held for this map, or inside a Pool until the pool closes (the pool's
            # maps reuse it without resending).
            if pool is not None:
                self.pool_code.setdefault(pool, set()).add(func_obj.id)
            else:
                per_map.append(func_obj.id)
        map_common = has_common and common_obj is None
        if map_common:
            common_obj = self.data_object(per_map_common, "common", "common", job=jid)
            per_map.append(common_obj.id)
        ck = None
        if checkpoint is not None:
            from . import _checkpoint

            try:
                ck = _checkpoint.open_map(checkpoint, func, source, common=per_map_common,
                                          has_common=map_common, seed=seed, errors=errors,
                                          ranks=self.nworkers + 1)
            except BaseException:
                for oid in per_map:
                    self.objects.pop(oid, None)
                raise
            source = ck.source
        spec = {"job": jid, "func": func_obj.id,
                "common": None if common_obj is None else common_obj.id,
                "pool": pool, "seed": seed, "nargs": source.nargs,
                "fail_fast": errors == "raise", "checkpoint": ck is not None,
                "bundle": None if bundle is None else {"id": bundle.id, "files": bundle.has_files,
                                                       "top": bundle.top}}
        if bundle is not None and bundle.has_files:
            self.bundles.open_job(jid)
        planner = ChunkPlanner(self.nworkers, chunksize,
                               target_seconds=self.cfg["MPIMAP_CHUNK_SECONDS"],
                               prefetch=self.cfg["MPIMAP_PREFETCH"],
                               history=func_obj.per_item)
        read_ahead = self.cfg["MPIMAP_READ_AHEAD"] if lazy else 0
        bar = _progress_bar(progress, source.length)
        job = Job(self, jid, spec, source, planner, ordered, errors == "raise", bar,
                  read_ahead if lazy else None, per_map)
        job.func_obj = func_obj
        if ck is not None:
            job.checkpoint = ck
            ck.on_done = lambda start, values, failed: self._ready_done(job, values, failed)
            ck.on_error = lambda exc: self._fail(job, exc)
        self.jobs[jid] = job
        self._place(func_obj)
        if common_obj is not None:
            self._place(common_obj)
        return job

    def _read_ahead_limit(self, job: Job) -> int | None:
        if job.read_ahead is None:
            return None
        if job.read_ahead:
            return job.read_ahead
        size = job.planner.size(job.source.remaining)
        return max(64, 4 * self.nworkers * job.planner.prefetch * size)

    def fill(self, job: Job) -> None:
        """Hand chunks of ``job`` to workers with room, least loaded first."""
        if job.failure is not None or job.closed:
            return
        if job.checkpoint is not None and self._stopping(job):
            return
        limit = self._read_ahead_limit(job)
        depth = job.planner.depth()
        while not job.source.exhausted:
            if limit is not None and job.pending_items() >= limit:
                return
            best = None
            for w in self.workers.values():
                if w.alive and len(w.inflight) < depth and \
                        (best is None or len(w.inflight) < len(best.inflight)):
                    best = w
                    if not w.inflight:
                        break
            if best is None:
                return
            n = job.planner.size(job.source.remaining)
            if limit is not None:
                n = max(1, min(n, limit - job.pending_items()))
            items = job.source.take(n)
            if items is None:
                return
            self._send_chunk(job, best, items)

    def _send_chunk(self, job: Job, w: _WorkerState, items) -> None:
        n = len(items)
        start = job.source.taken - n
        try:
            packed = _serial.dumps_data(items, to_worker=True)
        except Exception as exc:
            self._fail(job, SerializationError(_explain_items(items, start, exc)))
            return
        job.planner.record_size(n, packed.nbytes)
        cid = job.next_chunk
        job.next_chunk += 1
        meta = {"job": job.id, "chunk": cid, "start": start, "n": n}
        payloads = []
        if job.id not in w.jobs:
            meta["spec"] = job.spec
            w.jobs.add(job.id)
            job.ranks_seen.add(w.rank)
            puts = []
            for oid in (job.spec["func"], job.spec["common"]):
                if oid is not None and oid not in w.objects:
                    obj = self.objects[oid]
                    puts.append((oid, obj.role, obj.what))
                    payloads.append(obj.packed)
                    w.objects.add(oid)
            if puts:
                meta["puts"] = puts
        if w.forget:
            self._attach_forget(w, meta)
        payloads.append(packed)
        w.inflight[(job.id, cid)] = (start, n)
        job.outstanding[cid] = (w.rank, start, n)
        self.hub.send(w.rank, Frame(TASK, meta, payloads))

    def _ready_done(self, job: Job, values, failed) -> bool:
        """Results of finished items read back from the checkpoint: a chunk that is ready."""
        if failed and job.fail_fast:  # a recorded failure that is not retried
            self._fail(job, values[failed[0]])
            return False
        cid = job.next_chunk
        job.next_chunk += 1
        job.items_done += len(values)
        if job.progress is not None:
            job.progress.update(len(values))
        if job.ordered:
            job.ready[cid] = values
        else:
            job.ready_order.append(values)
        return True

    def _stopping(self, job: Job) -> bool:
        """After a stop signal: no new chunks; queued ones are cancelled, running ones awaited
        for at most the grace period; then the map fails with the signal's exception."""
        ck = job.checkpoint
        if ck.stop_signal() is None:
            return False
        now = time.monotonic()
        if job.stop_by is None:
            job.stop_by = now + ck.grace
            for r in {r for r, _s, _n in job.outstanding.values()}:
                if self.workers[r].alive:
                    self.hub.send(r, Frame(CANCEL, job.id))
        if not job.outstanding or now >= job.stop_by:
            self._fail(job, ck.stopped())
        return True

    def _attach_forget(self, w, meta):
        meta["drop"] = [x for k, x in w.forget if k == "drop"]
        meta["forget"] = [x for k, x in w.forget if k == "job"]
        meta["pools"] = [x for k, x in w.forget if k == "pool"]
        w.forget = []

    def progress(self, timeout, spin: float = 0.0) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens) and handle events."""
        for ev in self.hub.poll(timeout, spin):
            if ev.frame is None:
                self._lost(ev.rank, ev.reason)
            elif ev.frame.kind == RESULT:
                self._on_result(ev.rank, ev.frame)
            elif ev.frame.kind == REPLY:
                if ev.frame.meta.get("what") == "shutdown":
                    self.workers[ev.rank].stopped = True  # its lifeline may close next
                self.replies.append((ev.rank, ev.frame.meta))

    def _on_result(self, rank, frame):
        meta = frame.meta
        w = self.workers[rank]
        jid, cid = meta["job"], meta["chunk"]
        w.inflight.pop((jid, cid), None)
        clash = None
        if meta.get("outputs"):  # files tasks created: kept even when the map is over
            n = sum(1 for rec in meta["outputs"] if rec[5])
            clash = self.bundles.write_outputs(jid, rank, meta["outputs"],
                                               frame.payloads[len(frame.payloads) - n:] if n
                                               else [])
        job = self.jobs.get(jid)
        if job is None or job.closed or meta.get("cancelled"):
            if clash is not None:
                import sys

                print(f"mpimap: {clash}", file=sys.stderr)
            if job is not None and not job.closed and meta.get("cancelled") \
                    and job.stop_by is not None:
                job.outstanding.pop(cid, None)  # never ran: a stopping map stops waiting for it
            return
        entry = job.outstanding.pop(cid, None)
        if entry is None:
            return
        _rank, start, n = entry
        if meta.get("setup"):
            self._fail(job, SerializationError(meta["setup"]))
            return
        if meta.get("bundle_error"):
            self._fail(job, BundleError(meta["bundle_error"]))
            return
        if clash is not None:
            self._fail(job, clash)
            return
        job.planner.record_time(n, meta["seconds"])
        if meta.get("scratch"):
            job.scratch_ranks.add(rank)
        try:
            results = _serial.loads(frame.payloads[0].codec, frame.payloads[0].data,
                                    frame.payloads[0].buffers)
        except Exception as exc:
            self._fail(job, SerializationError(
                f"the results of items {start}..{start + n - 1}, computed on {w.where}, "
                f"could not be rebuilt on rank 0: {type(exc).__name__}: {exc}. Fix: return "
                f"plain data (numbers, strings, numpy arrays, lists/dicts of them), and make "
                f"sure every class they use is importable on rank 0."))
            return
        if meta["errors"]:
            exc_payloads = iter(frame.payloads[1:])
            for offset, tname, text, tb, has in meta["errors"]:
                packed = next(exc_payloads) if has else None
                exc = _rebuild(tname, text, tb, packed,
                               f"item {start + offset} on {w.where}")
                if job.fail_fast:
                    if job.checkpoint is not None:  # what ran before it is kept
                        job.checkpoint.record(start, results[:offset] + [exc],
                                              [(offset, tname, text, tb)])
                    self._fail(job, exc)
                    return
                results[offset] = exc
        if job.checkpoint is not None:
            job.checkpoint.record(start, results, [e[:4] for e in meta["errors"]])
        job.items_done += n
        if job.progress is not None:
            job.progress.update(n)
        if job.ordered:
            job.ready[cid] = results
        else:
            job.ready_order.append(results)

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.failure is None:
            job.failure = exc
        self.cancel(job)

    def _lost(self, rank, reason):
        w = self.workers.get(rank)
        if w is None or not w.alive or w.stopped:
            return  # a worker that acknowledged SHUTDOWN may close its lifeline: not a loss
        w.alive = False
        if self._bundles is not None:
            self._bundles.lost(rank)
        held: dict = {}
        for (jid, _cid), (start, n) in w.inflight.items():
            held.setdefault(jid, []).extend(range(start, start + n))
        w.inflight.clear()
        why = f" ({reason})" if reason else ""
        for jid, items in held.items():
            job = self.jobs.get(jid)
            if job is None or job.closed:
                continue
            for cid, (r, _s, _n) in list(job.outstanding.items()):
                if r == rank:
                    del job.outstanding[cid]
            self._fail(job, WorkerLostError(
                f"worker {w.where} died{why} while it held item(s) {format_items(items)} of "
                f"this map. Its results are lost; the other ranks are still usable. A common "
                f"cause is running out of memory (check the job's stderr / dmesg) or a crash in "
                f"compiled code.", rank=rank, host=w.info.host, items=items))

    def cancel(self, job: Job) -> None:
        if job.closed:
            return
        job.closed = True
        ranks = {r for r, _s, _n in job.outstanding.values()}
        for r in ranks:
            if self.workers[r].alive:
                self.hub.send(r, Frame(CANCEL, job.id))
        job.outstanding.clear()

    def finish(self, job: Job) -> None:
        """End of a map (normal or not): cancel what is left, free its objects on the workers."""
        if not job.complete or job.failure is not None:
            self.cancel(job)
        job.closed = True
        if job.planner.per_item is not None:
            job.func_obj.per_item = job.planner.per_item
        if job.progress is not None:
            job.progress.close()
        self.jobs.pop(job.id, None)
        drop = set(job.objects) - self._still_needed()
        for oid in drop:
            self.objects.pop(oid, None)
        for w in self.live:  # also those that got a broadcast object but no chunk
            seen = w.rank in job.ranks_seen
            if seen:
                w.jobs.discard(job.id)
                w.forget.append(("job", job.id))
            # a checkpointed map's workers take their signal handlers back at once
            urgent = seen and (w.rank in job.scratch_ranks or job.checkpoint is not None)
            for oid in drop & w.objects:
                w.objects.discard(oid)
                w.forget.append(("drop", oid))
                urgent = True
            if urgent:  # free memory / wipe scratch now; otherwise it rides on the next frame
                meta = {}
                self._attach_forget(w, meta)
                self.hub.send(w.rank, Frame(DROP, meta))
        if job.checkpoint is not None:
            # Writes the file; raises the stop signal's exception if one came.
            job.checkpoint.close(job.failure)

    # -- iteration ---------------------------------------------------------------------------------

    def _wait(self, job: Job):
        """Wait for results; spin first if the next one is due within the spin window."""
        spin = self.cfg["MPIMAP_SPIN"]
        per_item = job.planner.per_item
        if spin and per_item is not None and job.outstanding:
            soonest = min(n for _r, _s, n in job.outstanding.values()) * per_item
            if soonest > 4 * spin:
                spin = 0.0
        # A checkpointed map wakes up now and then to notice a stop signal (its handler only
        # sets a flag; a wait would resume after it).
        self.progress(None if job.checkpoint is None else 0.25, spin)

    def iterate(self, job: Job):
        """Generator of results (input order if ``job.ordered``, else completion order)."""
        try:
            while True:
                if job.failure is not None:
                    raise job.failure
                self.fill(job)
                if job.ordered:
                    while job.next_out in job.ready:
                        results = job.ready.pop(job.next_out)
                        job.next_out += 1
                        job.items_out += len(results)
                        yield from results
                else:
                    while job.ready_order:
                        results = job.ready_order.pop(0)
                        job.items_out += len(results)
                        yield from results
                if job.failure is not None:
                    raise job.failure
                if job.complete and not job.ready and not job.ready_order:
                    return
                self.fill(job)
                if (job.next_out not in job.ready) if job.ordered else not job.ready_order:
                    self._wait(job)
        finally:
            self.finish(job)

    def run(self, job: Job) -> list:
        """All results of ``job`` as a list in input order (the pmap path)."""
        try:
            while not job.complete:
                if job.failure is not None:
                    raise job.failure
                self.fill(job)
                if job.failure is not None:
                    raise job.failure
                if job.complete:
                    break
                self._wait(job)
            if job.failure is not None:
                raise job.failure
            if job.ordered:
                return list(itertools.chain.from_iterable(
                    job.ready.pop(c) for c in range(job.next_chunk)))
            return list(itertools.chain.from_iterable(job.ready_order))
        finally:
            self.finish(job)

    # -- end of the session -------------------------------------------------------------------------

    def release(self) -> None:
        """Collective mode: let every worker return from the pmap call it is serving."""
        for w in self.live:
            meta = {}
            if w.forget:
                self._attach_forget(w, meta)
                self.hub.send(w.rank, Frame(DROP, meta))
            self.hub.send(w.rank, Frame(RELEASE))

    def shutdown(self, timeout: float) -> list:
        """Tell every worker to exit; returns the ranks that did not acknowledge in time."""
        if self.closed:
            return []
        self.closed = True
        for job in list(self.jobs.values()):
            self.cancel(job)
        waiting = {w.rank for w in self.live}
        # After a rank died, MPI_Finalize may wait for it forever: everyone leaves without it.
        lost = any(not w.alive for w in self.workers.values())
        for r in waiting:
            self.hub.send(r, Frame(SHUTDOWN, {"abandon": lost}))
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.progress(min(left, 0.5))
            for rank, _meta in self._take_replies("shutdown"):
                waiting.discard(rank)
                self.workers[rank].stopped = True
            waiting &= {w.rank for w in self.live}
        return sorted(waiting)


def _what_func(func) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"the function `{name}`"


def _explain_items(items, start, exc) -> str:
    bad = None
    for i, item in enumerate(items):
        try:
            _serial.dumps_data(item, to_worker=True)
        except Exception as e:
            bad = (start + i, item, e)
            break
    if bad is None:
        return (f"the items {start}..{start + len(items) - 1} cannot be sent to the workers: "
                f"{type(exc).__name__}: {exc}")
    index, item, e = bad
    return (f"item {index} ({_serial._short(item)}, type {type(item).__module__}."
            f"{type(item).__qualname__}) cannot be sent to the workers: {type(e).__name__}: "
            f"{e}. Fix: pass plain data (numbers, strings, paths, numpy arrays) as items and "
            f"build live objects (files, connections, locks) inside the function.")


def _rebuild(tname, text, tb, packed, where) -> BaseException:
    exc = None
    reason = ""
    if packed is not None:
        try:
            exc = _serial.loads(packed.codec, packed.data, packed.buffers)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
    if not isinstance(exc, BaseException):
        exc = RemoteError(tname, text, tb, reason or "it could not be pickled on the worker")
    return attach_remote(exc, tb, where) if tb else exc


def _progress_bar(progress, total):
    if progress is False or progress is None:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="item", desc="mpimap", dynamic_ncols=True)
    if not hasattr(progress, "update"):
        raise TypeError("progress must be True/False or an object with an update(n) method "
                        f"(a tqdm bar); got {type(progress).__name__}")
    bar = progress
    return _ForeignBar(bar)


class _ForeignBar:
    """A user's bar: we update it but do not close it."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n):
        self.bar.update(n)

    def close(self):
        pass
