"""The public map functions and Pool. Argument checks happen here, before any work starts."""

from __future__ import annotations

import numbers

from . import _runtime

__all__ = ["Pool", "imap", "imap_unordered", "pmap"]


def _check(func, errors, ordered, seed, progress, files=None, modules=None, chunksize=None):
    _check_bundle_args(files, modules)
    if not callable(func):
        raise TypeError(f"the function to map must be callable; got {type(func).__name__}")
    if errors not in ("raise", "return"):
        raise ValueError(f'errors must be "raise" or "return", not {errors!r}')
    if chunksize is not None and (isinstance(chunksize, bool) or
                                  not isinstance(chunksize, numbers.Integral) or chunksize < 1):
        raise ValueError(f"chunksize must be a positive int or None (automatic), "
                         f"not {chunksize!r}")
    if not isinstance(ordered, bool):
        raise TypeError(f"ordered must be True or False, not {ordered!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, not {seed!r}")
    if not (isinstance(progress, bool) or hasattr(progress, "update")):
        raise TypeError("progress must be True/False or a tqdm-like object with update(n); "
                        f"got {type(progress).__name__}")
    return None if seed is None else int(seed)


def _check_bundle_args(files, modules):
    """Types only; paths and modules are checked where the map runs (_stage / serial)."""
    import os
    import types

    for name, value, ok in (("files", files, (str, os.PathLike)),
                            ("modules", modules, (str, types.ModuleType))):
        if value is None or isinstance(value, ok):
            continue
        if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{name}= must be a list of "
                            f"{'paths' if name == 'files' else 'module names'}, not "
                            f"{type(value).__name__}")


def pmap(func, iterable, *iterables, common=None, files=None, modules=None, chunksize=None,
         ordered=True, errors="raise", progress=False, checkpoint=None, seed=None):
    """Map ``func`` over the inputs in parallel; returns the list of results.

    ``func(*args)`` is called for each tuple of items (one per iterable, zipped, shortest wins);
    with ``common`` it is ``func(*args, common)``: common is sent once per map and is read-only
    in every task. ``ordered=False`` returns results in completion order. ``errors="raise"``
    raises the first task exception to arrive (its own type, with the remote traceback chained);
    ``errors="return"`` puts exception objects in place of results. ``seed`` makes
    ``mpimap.rng()`` inside a task depend on (seed, item index) only. ``chunksize=None`` picks
    chunk sizes automatically. ``checkpoint="run.h5"`` (or ``mpimap.Checkpoint(...)``) writes
    results to an HDF5 file as they arrive; a rerun computes only the missing items.

    ``files=[path, dir, glob, ...]`` (relative to the current directory) are bundled once,
    staged once per node into a node-local cache, and opened inside tasks by the same relative
    paths; files a task creates in its working directory come back here. ``modules=[name,
    ...]`` ships local modules/packages to workers that cannot see the source tree (the local
    modules the function imports are found and shipped without it). See the README, "Data
    files and local modules".

    Called on rank 0 under ``python -m mpimap``; with no launcher it runs in-process; under
    ``mpiexec python script.py`` every rank calls it and ranks other than 0 get ``None``.
    Inside a task it runs serially in that task.
    """
    seed = _check(func, errors, ordered, seed, progress, files, modules, chunksize)
    return _runtime.executor().map(None, func, (iterable, *iterables), common=common,
                                   has_common=common is not None, chunksize=chunksize,
                                   ordered=ordered, errors=errors, progress=progress, seed=seed,
                                   files=files, modules=modules, **_ck(checkpoint))


def imap(func, iterable, *iterables, common=None, files=None, modules=None, chunksize=None,
         errors="raise", progress=False, checkpoint=None, seed=None):
    """Lazy ``pmap``: results in input order as they become available.

    The input is read as workers free up, with a bounded number of items in flight, so a
    generator of millions of items is never held in memory. Leaving the loop early cancels the
    rest.
    """
    seed = _check(func, errors, True, seed, progress, files, modules, chunksize)
    return _runtime.executor().imap(None, func, (iterable, *iterables), common=common,
                                    has_common=common is not None, chunksize=chunksize,
                                    ordered=True, errors=errors, progress=progress, seed=seed,
                                    files=files, modules=modules, **_ck(checkpoint))


def imap_unordered(func, iterable, *iterables, common=None, files=None, modules=None,
                   chunksize=None, errors="raise", progress=False, checkpoint=None, seed=None):
    """Like ``imap``, but results come in completion order."""
    seed = _check(func, errors, False, seed, progress, files, modules, chunksize)
    return _runtime.executor().imap(None, func, (iterable, *iterables), common=common,
                                    has_common=common is not None, chunksize=chunksize,
                                    ordered=False, errors=errors, progress=progress, seed=seed,
                                    files=files, modules=modules, **_ck(checkpoint))


def _ck(checkpoint, pool=None) -> dict:
    """``checkpoint=`` checked before any work; executors get it only when one is given."""
    if checkpoint is None:
        return {}
    from . import _checkpoint

    if pool is None:
        return {"checkpoint": _checkpoint.spec(checkpoint)}
    return {"checkpoint": _checkpoint.spec(checkpoint, *pool._identity)}


class Pool:
    """Workers that persist across maps, with optional per-pool common data and initializer.

    ``initializer(*initargs)`` runs once on every worker when the pool is created; globals it
    sets are visible to the functions the pool maps. ``common`` is sent once for the pool's
    lifetime and passed as the last argument of every call.

    ``pool.map(func, iterable)`` is what emcee's ``pool=`` and scipy's ``workers=pool.map``
    expect. Use as a context manager, or call ``close()``.
    """

    def __init__(self, common=None, initializer=None, initargs=()):
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable; got {type(initializer).__name__}")
        self._executor = _runtime.executor()
        self._handle = self._executor.open_pool(common, common is not None, initializer,
                                                tuple(initargs))
        self._closed = False
        # what a checkpointed map of this pool also depends on (hashed only if one is used)
        self._identity = (common, common is not None, initializer, tuple(initargs))

    @property
    def size(self) -> int:
        """Number of processes that run tasks."""
        return self._executor.nworkers

    def _live(self):
        if self._closed:
            raise ValueError("this mpimap.Pool is closed")
        return self._executor

    def map(self, func, iterable, *iterables, chunksize=None, ordered=True, errors="raise",
            progress=False, seed=None, checkpoint=None):
        seed = _check(func, errors, ordered, seed, progress, chunksize=chunksize)
        return self._live().map(self._handle, func, (iterable, *iterables),
                                chunksize=chunksize, ordered=ordered, errors=errors,
                                progress=progress, seed=seed, **_ck(checkpoint, self))

    def imap(self, func, iterable, *iterables, chunksize=None, errors="raise", progress=False,
             seed=None, checkpoint=None):
        seed = _check(func, errors, True, seed, progress, chunksize=chunksize)
        return self._live().imap(self._handle, func, (iterable, *iterables),
                                 chunksize=chunksize, ordered=True, errors=errors,
                                 progress=progress, seed=seed, **_ck(checkpoint, self))

    def imap_unordered(self, func, iterable, *iterables, chunksize=None, errors="raise",
                       progress=False, seed=None, checkpoint=None):
        seed = _check(func, errors, False, seed, progress, chunksize=chunksize)
        return self._live().imap(self._handle, func, (iterable, *iterables),
                                 chunksize=chunksize, ordered=False, errors=errors,
                                 progress=progress, seed=seed, **_ck(checkpoint, self))

    def close(self) -> None:
        """Free the pool's common data on the workers. The worker processes stay up."""
        if not self._closed:
            self._closed = True
            self._executor.close_pool(self._handle)

    def join(self) -> None:
        """For multiprocessing compatibility: nothing to wait for after close()."""

    terminate = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __call__(self, func, iterable):
        """``pool(func, iterable)``: the call form scipy's ``workers=`` also accepts."""
        return self.map(func, iterable)
