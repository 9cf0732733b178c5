"""Chunking and input reading: pure, no MPI.

Automatic chunk size (``chunksize=None``), for ``R`` items left and ``P`` workers:

    size = min(CHUNK_BYTES / b_item,               # a bounded message
               max(MIN_SECONDS / t_item,           # never less than ~0.2 ms of work: below that
                                                   #   a round trip costs more than it saves
                   min(ceil(R / (4P)),             # guided self-scheduling: the tail stays short
                       T / t_item)))               # about T of work per chunk

    T = max(CHUNK_SECONDS, P * RANK0_SECONDS)      # 10 ms, or more with many workers, so rank 0
                                                   #   (~0.1-0.2 ms per chunk) stays under ~40 %
                                                   #   busy handing them out

Small chunks matter for skewed work: a long task delays every item queued behind it in its chunk,
and two long tasks in one chunk at the end of a map double the tail.

``t_item`` is the compute time per item measured by the workers (the median over the last chunks,
so neither a slow first call nor one huge item swings it) and ``b_item`` the pickled bytes per item.
Until the first chunk comes back a worker gets one probe chunk of at most PREFETCH items (and no
more than its share), so a map of a few hour-long tasks is never batched blindly. With an unknown
input length only the time and byte bounds apply, plus a cap on items per chunk. When the same
function ran before, its last measured ``t_item`` decides one thing up front: a whole map that is
expected to take less than MIN_SECONDS goes to one worker as one chunk (a warm pool's small maps,
emcee's steps with cheap likelihoods, cost one round trip).

A worker holds up to PREFETCH chunks while a chunk is expected to last at most 2T (the next chunk
is already there when one finishes, so no round trip is idle time; what can wait behind a slow
task is at most one short chunk), and one chunk otherwise (long tasks: nothing waits behind a
slow one on a busy worker).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Sequence

__all__ = ["ChunkPlanner", "ItemSource"]

CHUNK_BYTES = 32 << 20
MIN_SECONDS = 2e-4
RANK0_SECONDS = 5e-4  # budget of rank-0 time per chunk, per worker (sets T for big pools)
UNKNOWN_LENGTH_MAX = 8192  # items per chunk when the input length is unknown (bounds read-ahead)


class ChunkPlanner:
    def __init__(self, nworkers: int, chunksize: int | None = None, *,
                 target_seconds: float = 0.01, prefetch: int = 2,
                 history: float | None = None):
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive int or None, not {chunksize!r}")
        self.nworkers = max(1, nworkers)
        self.fixed = chunksize
        self.target = max(target_seconds, self.nworkers * RANK0_SECONDS)
        self.prefetch = prefetch
        self.history = history
        self.recent: deque = deque(maxlen=16)
        self._per_item: float | None = None
        self.items_sized = 0
        self.nbytes = 0

    @property
    def per_item(self) -> float | None:
        return self._per_item

    def record_time(self, n_items: int, seconds: float) -> None:
        if n_items > 0:
            self.recent.append(max(seconds, 0.0) / n_items)
            self._per_item = statistics.median(self.recent)

    def record_size(self, n_items: int, nbytes: int) -> None:
        if n_items > 0:
            self.items_sized += n_items
            self.nbytes += nbytes

    def size(self, remaining: int | None) -> int:
        """Items in the next chunk; ``remaining`` is None when the input length is unknown."""
        if self.fixed is not None:
            size = self.fixed
        else:
            per_item = self.per_item
            if per_item is None:
                if self.history is not None and remaining is not None and \
                        remaining * self.history < MIN_SECONDS:
                    size = remaining
                else:
                    size = self.prefetch
                    if remaining is not None:
                        size = min(size, math.ceil(remaining / self.nworkers))
            else:
                per_item = max(per_item, 1e-9)
                size = int(self.target / per_item)
                if remaining is not None:
                    size = min(size, math.ceil(remaining / (4 * self.nworkers)))
                size = max(size, math.ceil(MIN_SECONDS / per_item))
                if self.items_sized:
                    size = min(size, int(CHUNK_BYTES * self.items_sized / max(self.nbytes, 1)))
                if remaining is None:
                    size = min(size, UNKNOWN_LENGTH_MAX)
        if remaining is not None:
            size = min(size, remaining)
        return max(1, size)

    def depth(self) -> int:
        """How many chunks a worker may hold (running + queued)."""
        if self.fixed is not None:
            return self.prefetch
        per_item = self.per_item
        if per_item is None:
            return 1
        return self.prefetch if per_item * self.size(None) <= 2 * self.target else 1


class ItemSource:
    """The zipped input of a map, read chunk by chunk.

    Sequences (list, tuple, range, numpy arrays...) are sliced, so a chunk of a list costs one C
    slice; anything else is read lazily with ``islice``, never materialised ahead of need.
    Chunks of several iterables are lists of argument tuples.
    """

    def __init__(self, iterables):
        if not iterables:
            raise TypeError("pmap() needs at least one iterable of inputs")
        self.nargs = len(iterables)
        self.seqs = None
        self.length = None
        self.taken = 0
        self.exhausted = False
        if all(isinstance(it, Sequence) or _is_array(it) for it in iterables):
            try:
                self.length = min(len(it) for it in iterables)
                self.seqs = list(iterables)
            except TypeError:
                self.seqs = None
        if self.seqs is None:
            for it in iterables:
                try:
                    iter(it)
                except TypeError:
                    raise TypeError(
                        f"pmap() inputs must be iterable; got {type(it).__name__}") from None
            self.iterator = iter(iterables[0]) if self.nargs == 1 else zip(*iterables)
            try:
                import operator
                hint = operator.length_hint(iterables[0], -1) if self.nargs == 1 else -1
            except Exception:
                hint = -1
            self.hint = hint if hint >= 0 else None

    @property
    def remaining(self) -> int | None:
        if self.length is not None:
            return self.length - self.taken
        if self.hint is not None:
            return max(self.hint - self.taken, 1) if not self.exhausted else 0
        return None

    def take(self, n: int):
        """Next chunk of at most ``n`` items (a list or a slice), or None at the end."""
        if self.exhausted:
            return None
        start = self.taken
        if self.seqs is not None:
            stop = min(start + n, self.length)
            if stop <= start:
                self.exhausted = True
                return None
            if self.nargs == 1:
                chunk = self.seqs[0][start:stop]
            else:
                chunk = list(zip(*(s[start:stop] for s in self.seqs)))
            self.taken = stop
            if stop >= self.length:
                self.exhausted = True
            return chunk
        chunk = list(itertools.islice(self.iterator, n))
        if not chunk:
            self.exhausted = True
            return None
        self.taken += len(chunk)
        if len(chunk) < n:
            self.exhausted = True
        return chunk


def _is_array(obj) -> bool:
    return hasattr(obj, "__array_interface__") and hasattr(obj, "__len__") and \
        hasattr(obj, "__getitem__")
