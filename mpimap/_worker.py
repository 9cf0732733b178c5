"""A serving rank's loop.

    rank 0 ──PUT (function / common, by id)──────────────▶ objects{id: value}
           ──POOL (initializer)──────────────────────────▶ run once, REPLY
           ──TASK (job spec the first time, items)───────▶ run chunk ──RESULT──▶ rank 0
           ──CANCEL job──────────────────────────────────▶ queued chunks of it are skipped
           ──DROP ids / RELEASE / SHUTDOWN──────────────▶
           ──BUNDLE query/begin/data/end (stager) / use ─▶ _stage.WorkerBundles
                    TASK of a map with files= runs in the rank's working directory; the files
                    its tasks create go back with the RESULT (_workdir)

Frames are handled in arrival order, except that before a chunk starts every frame already
delivered is read, so a CANCEL behind a queued chunk takes effect before that chunk runs. A chunk
that is already running finishes (its result is discarded by rank 0). Every TASK gets exactly one
RESULT, so rank 0 always knows how many chunks each worker holds.

A task's exception never ends the worker: it is recorded with its traceback, and the rest of the
chunk runs (errors="return") or is skipped (errors="raise", fail fast). While it holds a map with a
checkpoint, SIGTERM/SIGINT/SIGUSR1 are ignored (``_checkpoint.worker_signals``): rank 0 decides.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections import deque

from . import _checkpoint, _serial, _task, _workdir
from ._errors import MpimapError, SerializationError
from ._shm import ShareUnavailable
from ._transport import (BUNDLE, CANCEL, DROP, POOL, PUT, RELEASE, REPLY, RESULT, SHUTDOWN, TASK,
                         Frame)

__all__ = ["serve"]

_NO_COMMON = object()


class _Failed:
    """An object that could not be loaded on this worker; using it reports ``text``."""

    def __init__(self, text):
        self.text = text


class _Job:
    __slots__ = ("id", "func", "common", "seed", "nargs", "fail_fast", "setup_error", "bundle",
                 "dirs", "checkpoint")

    def __init__(self, spec, objects, overlays, undo=None):
        self.id = spec["job"]
        self.seed = spec["seed"]
        self.nargs = spec["nargs"]
        self.fail_fast = spec["fail_fast"]
        self.checkpoint = bool(spec.get("checkpoint"))
        self.setup_error = None
        self.bundle = spec.get("bundle")
        self.dirs = None
        self.func = objects.get(spec["func"])
        cid = spec.get("common")
        self.common = _NO_COMMON if cid is None else objects.get(cid)
        for obj in (self.func, self.common):
            if isinstance(obj, _Failed):
                self.setup_error = obj.text
        if self.setup_error is None:
            overlay = overlays.get(spec.get("pool"))
            if overlay:
                _apply_overlay(self.func, overlay,
                               None if undo is None else undo.setdefault(spec["pool"], []))


_MISSING = object()


def _apply_overlay(func, overlay, undo=None):
    """Make globals set by a Pool initializer visible to the mapped function and its helpers.

    ``undo`` collects (globals, name, previous value) so closing the pool takes them back out
    (they may hold large data: the pool's memory must go with the pool).
    """
    seen = set()
    stack = [func]
    while stack:
        f = stack.pop()
        g = getattr(f, "__globals__", None)
        if g is None:
            f = getattr(f, "func", None) or getattr(f, "__func__", None)  # partial, bound method
            if f is not None:
                stack.append(f)
            continue
        if id(g) in seen:
            continue
        seen.add(id(g))
        if g.get("__name__") == "__main__":
            if undo is not None:
                undo.extend((g, k, g.get(k, _MISSING)) for k in overlay)
            g.update(overlay)
        stack.extend(v for v in list(g.values())
                     if callable(v) and getattr(v, "__module__", None) == "__main__")


def _format_tb(exc) -> str:
    tb = exc.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # drop our own loop's frame
    while tb is not None and tb.tb_next is not None and \
            tb.tb_frame.f_code.co_filename == _workdir.__file__:
        tb = tb.tb_next  # and the wrapper that collects a task's output files
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _type_name(exc) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ in ("builtins", "__main__") else \
        f"{t.__module__}.{t.__qualname__}"


class Worker:
    def __init__(self, ep, inproc: bool = False):
        self.ep = ep
        self.inproc = inproc
        self.objects: dict = {}
        self.jobs: dict = {}
        self.overlays: dict = {}
        self.undo: dict = {}  # pool -> [(globals, name, previous value)] to restore at close
        self.cancelled: set = set()
        self.backlog: deque = deque()
        self.abandon = False  # set by SHUTDOWN when a rank died: skip MPI_Finalize
        self.bundles = None  # _stage.WorkerBundles, made at the first BUNDLE frame
        _workdir.install_hook()

    def _bundles(self):
        if self.bundles is None:
            from ._stage import WorkerBundles

            self.bundles = WorkerBundles(self)
        return self.bundles

    # -- loop ------------------------------------------------------------------------------------

    def serve(self) -> str:
        """Handle frames until RELEASE or SHUTDOWN; returns which one ended it."""
        while True:
            frame = self.backlog.popleft() if self.backlog else self.ep.recv(None)
            if frame is None:
                continue
            kind = frame.kind
            if kind == TASK:
                self._drain()
                self._task(frame)
            elif kind == PUT:
                self._put(frame.meta["puts"], frame.payloads)
            elif kind == CANCEL:
                self.cancelled.add(frame.meta)
                self._wipe(frame.meta)
            elif kind == BUNDLE:
                self._bundles().handle(frame)
            elif kind == DROP:
                self._drop(frame.meta)
            elif kind == POOL:
                self._pool(frame)
            elif kind == RELEASE:
                return "release"
            elif kind == SHUTDOWN:
                _task.remove_rank_dir(self.ep.rank, self.ep.info.node)
                self.ep.send(Frame(REPLY, {"what": "shutdown", "ok": True}))
                self.ep.flush()
                self.abandon = bool(frame.meta and frame.meta.get("abandon"))
                return "shutdown"

    def _drain(self):
        while True:
            frame = self.ep.recv(0)
            if frame is None:
                return
            if frame.kind == CANCEL:
                self.cancelled.add(frame.meta)
                self._wipe(frame.meta)
            else:
                self.backlog.append(frame)

    # -- objects ---------------------------------------------------------------------------------

    def _put(self, puts, payloads):
        for (oid, role, what), packed in zip(puts, payloads):
            try:
                obj = _serial.loads(packed.codec, packed.data, packed.buffers,
                                    readonly=(role == "common"))
                if role == "common":
                    obj = _serial.freeze(obj)
                elif role == "code":
                    g = getattr(obj, "__globals__", None)
                    if g is not None:
                        _serial.register_main_classes(g)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                if isinstance(exc, ShareUnavailable):  # its message names its own fix
                    obj = _Failed(f"{what} did not reach rank {self.ep.rank} "
                                  f"({self.ep.info.host}): {exc}")
                    self.objects[oid] = obj
                    continue
                obj = _Failed(
                    f"{what} could not be loaded on rank {self.ep.rank} "
                    f"({self.ep.info.host}): {type(exc).__name__}: {exc}. Fix: make sure every "
                    f"module it needs is importable on the workers (same environment and "
                    f"sys.path as rank 0), or ship local modules with modules=.\n"
                    f"Worker traceback:\n{_format_tb(exc)}")
            self.objects[oid] = obj

    def _drop(self, meta):
        for oid in meta.get("drop", ()):
            self.objects.pop(oid, None)
        for pid in meta.get("pools", ()):
            overlay = self.overlays.pop(pid, None) or {}
            for g, name, old in reversed(self.undo.pop(pid, [])):
                if name in overlay and g.get(name, _MISSING) is overlay[name]:
                    if old is _MISSING:
                        del g[name]
                    else:
                        g[name] = old
        for jid in meta.get("forget", ()):
            job = self.jobs.pop(jid, None)
            if job is not None and job.checkpoint:
                _checkpoint.worker_signals(False)
            self.cancelled.discard(jid)
            if job is not None and job.dirs is not None and job.dirs.touched():
                _task.remove_scratch(jid, self.ep.rank, self.ep.info.node)

    def _wipe(self, jid):
        """A cancelled map's directories go now (its finished outputs were already sent)."""
        job = self.jobs.get(jid)
        if job is not None and job.dirs is not None and job.dirs.touched():
            _task.remove_scratch(jid, self.ep.rank, self.ep.info.node)

    def _pool(self, frame):
        meta = frame.meta
        self._put(meta["puts"], frame.payloads)
        pool = meta["pool"]
        reply = {"what": "pool", "pool": pool, "ok": True}
        init = self.objects.get(meta["init"]) if meta["init"] is not None else None
        if isinstance(init, _Failed):
            reply.update(ok=False, error=init.text)
        elif init is not None:
            func, args = init
            g = getattr(func, "__globals__", None)
            before = dict(g) if g is not None else {}
            try:
                func(*args)
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt):
                    raise
                reply.update(ok=False, error=f"the Pool initializer raised on rank "
                             f"{self.ep.rank} ({self.ep.info.host}):\n{_format_tb(exc)}")
            if g is not None:
                self.overlays[pool] = {k: v for k, v in g.items()
                                       if k not in before or before[k] is not v}
                self.undo[pool] = [(g, k, before.get(k, _MISSING)) for k in self.overlays[pool]]
            if meta["init"] is not None:
                self.objects.pop(meta["init"], None)
        self.ep.send(Frame(REPLY, reply))

    # -- tasks -----------------------------------------------------------------------------------

    def _task(self, frame):
        meta = frame.meta
        jid = meta["job"]
        payloads = frame.payloads
        puts = meta.get("puts")
        if puts:
            self._put(puts, payloads[:len(puts)])
        if meta.get("drop") or meta.get("forget") or meta.get("pools"):
            self._drop(meta)
        spec = meta.get("spec")
        if spec is not None:
            self.jobs[jid] = _Job(spec, self.objects, self.overlays, self.undo)
            if spec.get("checkpoint"):
                # a stop signal must not end this rank: rank 0 saves the results and ends the run
                _checkpoint.worker_signals(True)
        reply = {"job": jid, "chunk": meta["chunk"], "n": meta["n"], "seconds": 0.0,
                 "errors": []}
        job = self.jobs.get(jid)
        if jid in self.cancelled or job is None:
            reply["cancelled"] = True
            self.ep.send(Frame(RESULT, reply))
            self._wipe(jid)
            return
        if job.setup_error is not None:
            reply["setup"] = job.setup_error
            self.ep.send(Frame(RESULT, reply))
            return
        if job.dirs is None:
            try:
                job.dirs = self._job_dirs(job)
            except (MpimapError, OSError) as exc:
                reply["bundle_error"] = (f"rank {self.ep.rank} ({self.ep.info.host}) cannot "
                                         f"prepare its working directory: {exc}")
                self.ep.send(Frame(RESULT, reply))
                return
        items_packed = payloads[-1]
        try:
            items = _serial.loads(items_packed.codec, items_packed.data, items_packed.buffers)
        except Exception as exc:
            reply["setup"] = (f"the items {meta['start']}..{meta['start'] + meta['n'] - 1} could "
                              f"not be loaded on rank {self.ep.rank} ({self.ep.info.host}): "
                              f"{type(exc).__name__}: {exc}\n{_format_tb(exc)}")
            self.ep.send(Frame(RESULT, reply))
            return
        with job.dirs.cwd(self.inproc):
            results, errors, seconds = self._run(job, items, meta["start"])
        if errors:
            errors = [(offset, _workdir.explain(exc, job.dirs)) for offset, exc in errors]
        reply["seconds"] = seconds
        if job.dirs.exists():
            reply["scratch"] = True  # rank 0 then sends a prompt DROP at the end of the map
        frame = self._pack_results(reply, results, errors, meta["start"])
        if job.dirs.work is not None:
            self._attach_outputs(job, frame)
        self.ep.send(frame)
        if jid in self.cancelled:
            job.dirs.remove()

    def _job_dirs(self, job):
        if job.bundle is None:
            return _workdir.JobDirs(self.ep.rank, job.id, self.ep.info.node)
        dirs = self._bundles().job_dirs(job.id, job.bundle)
        if dirs.work is not None:
            job.func = _workdir.wrap(job.func, dirs)
        return dirs

    def _attach_outputs(self, job, frame):
        """The files this chunk's tasks created, with the results (see _workdir)."""
        try:
            records, buffers = job.dirs.take()
        except OSError as exc:
            frame.meta["bundle_error"] = (f"the files that tasks created on rank "
                                          f"{self.ep.rank} ({self.ep.info.host}) could not be "
                                          f"read back: {exc}")
            return
        if records:
            frame.meta["outputs"] = records
            frame.payloads.extend(_serial.Packed(-1, b, []) for b in buffers)

    def _run(self, job, items, start):
        func = job.func
        common = job.common
        star = job.nargs > 1
        out: list = []
        errors = []
        info = self.ep.info
        _task.begin(_task._Running(start, out, job.seed, info.rank, self.ep.size, info.node,
                                   info.host, job.id, job.dirs))
        t0 = time.perf_counter()
        it = iter(items)
        try:
            while True:
                try:
                    if common is _NO_COMMON:
                        if star:
                            for args in it:
                                out.append(func(*args))
                        else:
                            for arg in it:
                                out.append(func(arg))
                    else:
                        if star:
                            for args in it:
                                out.append(func(*args, common))
                        else:
                            for arg in it:
                                out.append(func(arg, common))
                    break
                except Exception as exc:
                    errors.append((len(out), exc))
                    out.append(None)
                    if job.fail_fast:
                        break
                except SystemExit as exc:  # a task calling sys.exit() must not end the worker
                    errors.append((len(out), exc))
                    out.append(None)
                    if job.fail_fast:
                        break
        finally:
            seconds = time.perf_counter() - t0
            _task.end()
        return out, errors, seconds

    def _pack_results(self, reply, results, errors, start):
        payloads = []
        records = []
        for offset, exc in errors:
            tb = _format_tb(exc)
            try:
                packed = _serial.dumps_data(exc, to_worker=False)
            except Exception:
                packed = None
            records.append((offset, _type_name(exc), _safe_str(exc), tb, packed is not None))
            if packed is not None:
                payloads.append(packed)
        try:
            body = _serial.dumps_data(results, to_worker=False)
        except Exception:
            # Find the result(s) that cannot travel; the others still do.
            for offset, value in enumerate(results):
                try:
                    _serial.dumps_data(value, to_worker=False)
                except Exception as exc:
                    results[offset] = None
                    err = SerializationError(
                        f"the result of item {start + offset} ({_describe(value)}) cannot be sent "
                        f"back to rank 0: {type(exc).__name__}: {exc}. Fix: return plain data "
                        f"(numbers, strings, numpy arrays, lists/dicts of them) instead of live "
                        f"objects such as open files, locks or generators.")
                    records.append((offset, "mpimap.SerializationError", str(err), "", True))
                    payloads.append(_serial.dumps_data(err, to_worker=False))
            body = _serial.dumps_data(results, to_worker=False)
        reply["errors"] = records
        reply["bytes"] = body.nbytes
        for _offset, exc in errors:
            # The traceback holds _run's frame, whose locals hold the errors list: a cycle that
            # would keep `common` (and its shared pages) alive until a garbage-collector pass.
            exc.__traceback__ = None
        return Frame(RESULT, reply, [body] + payloads)


def _safe_str(exc) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"


def _describe(value) -> str:
    t = type(value)
    return f"a {t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else \
        f"a {t.__qualname__}"


def serve(ep, inproc: bool = False) -> str:
    """Run the worker loop on endpoint ``ep`` until RELEASE or SHUTDOWN."""
    return Worker(ep, inproc=inproc).serve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("mpimap._worker is started by mpimap itself")
