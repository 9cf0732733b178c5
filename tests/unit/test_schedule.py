"""Chunk sizing and input reading (pure)."""

from __future__ import annotations

import itertools

from mpimap._schedule import MIN_SECONDS, ChunkPlanner, ItemSource


def test_probe_before_any_timing():
    p = ChunkPlanner(4)
    assert p.size(1000) == 2  # at most PREFETCH items, no blind batching of long tasks
    assert p.size(3) == 1  # never more than a worker's share
    assert p.depth() == 1


def test_tiny_tasks_get_big_chunks_but_a_short_tail():
    p = ChunkPlanner(2, target_seconds=0.02)
    p.record_time(100, 100 * 1e-7)
    assert p.size(200_000) == 25_000  # guided: R / 4P
    assert p.size(100) >= int(MIN_SECONDS / 1e-7) or p.size(100) == 100
    assert p.depth() == 2


def test_long_tasks_get_small_chunks_and_no_queue():
    p = ChunkPlanner(2, target_seconds=0.02)
    p.record_time(4, 4 * 0.005)
    assert p.size(400) == 4  # 20 ms of 5 ms tasks
    p.record_time(1, 2.0)
    p.record_time(1, 2.0)
    assert p.size(400) <= 4
    assert p.depth() == 1


def test_median_timing_ignores_one_slow_first_call():
    p = ChunkPlanner(2, target_seconds=0.02)
    p.record_time(1, 0.5)  # e.g. an import on the first call
    for _ in range(4):
        p.record_time(1000, 1000 * 1e-6)
    assert p.size(10**6) == 20_000


def test_history_sends_a_tiny_map_as_one_chunk():
    assert ChunkPlanner(4, history=1e-6).size(10) == 10
    assert ChunkPlanner(4, history=1e-2).size(10) == 2


def test_fixed_chunksize_and_unknown_length_cap():
    p = ChunkPlanner(2, chunksize=7)
    assert p.size(100) == 7 and p.size(3) == 3
    q = ChunkPlanner(2)
    q.record_time(1000, 1e-6)
    assert q.size(None) <= 8192


def test_bytes_bound_on_chunks():
    p = ChunkPlanner(2)
    p.record_time(10, 10e-7)
    p.record_size(10, 10 * (8 << 20))  # 8 MiB per item
    assert p.size(10**6) == max(4, int(MIN_SECONDS / 1e-7)) or p.size(10**6) >= 4


def test_sequences_are_sliced_and_iterators_read_lazily():
    src = ItemSource((list(range(10)),))
    assert src.length == 10 and src.take(4) == [0, 1, 2, 3]
    assert src.take(100) == [4, 5, 6, 7, 8, 9] and src.take(1) is None

    pulled = []

    def gen():
        for i in itertools.count():
            pulled.append(i)
            yield i

    lazy = ItemSource((gen(),))
    assert lazy.remaining is None
    assert lazy.take(3) == [0, 1, 2] and len(pulled) == 3


def test_several_iterables_zip_to_the_shortest():
    src = ItemSource(([1, 2, 3], "ab"))
    assert src.take(10) == [(1, "a"), (2, "b")]
    mixed = ItemSource((iter([1, 2, 3]), [4, 5]))
    assert mixed.take(10) == [(1, 4), (2, 5)]


def test_target_grows_with_the_pool_so_rank0_keeps_up():
    assert ChunkPlanner(2).target == 0.01
    assert ChunkPlanner(256).target > 0.1  # 256 workers: fewer, longer chunks
