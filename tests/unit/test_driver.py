"""Rank 0's engine and the worker loop, over the in-process transport (real bytes, no MPI)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

import mpimap
from mpimap import _serial
from mpimap._errors import RemoteTraceback
from mpimap._schedule import UNKNOWN_LENGTH_MAX


def square(x):
    return x * x


def add3(a, b, c):
    return a + b + c


class Boom(ValueError):
    pass


def boom_at(x, bad=7):
    if x == bad:
        raise Boom(f"item {x} is bad")
    return x


class NeedsTwo(Exception):
    def __init__(self, a, b):  # pickles, but does not unpickle (args is one string)
        super().__init__(f"{a}/{b}")


def raise_needs_two(x):
    raise NeedsTwo(x, "extra")


class HoldsGenerator(Exception):
    def __init__(self):
        super().__init__("has a generator")
        self.gen = (i for i in range(3))  # neither pickle nor dill can carry a generator


def raise_holds_generator(x):
    raise HoldsGenerator()


def return_generator(x):
    return (i for i in range(x)) if x == 3 else x


def slow_unless_zero(x):
    if x == 0:
        raise Boom("zero")
    time.sleep(0.05)
    return x


def test_pmap_returns_results_in_input_order(engine):
    assert mpimap.pmap(square, range(1000)) == [x * x for x in range(1000)]


def test_several_iterables_zip_shortest_and_common(engine):
    assert mpimap.pmap(add3, [1, 2, 3], [10, 20, 30, 40], common=100) == [111, 122, 133]


def test_generator_input_and_empty_input(engine):
    assert mpimap.pmap(square, (x for x in range(50))) == [x * x for x in range(50)]
    assert mpimap.pmap(square, []) == []


def test_unordered_gives_every_result_once(engine):
    out = mpimap.pmap(square, range(300), ordered=False)
    assert sorted(out) == [x * x for x in range(300)]
    assert sorted(mpimap.imap_unordered(square, range(300))) == [x * x for x in range(300)]


def test_task_exception_is_its_own_type_with_remote_traceback(engine):
    with pytest.raises(Boom, match="item 7 is bad") as info:
        mpimap.pmap(boom_at, range(20))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "boom_at" in str(cause) and "item 7 on rank" in str(cause)
    if sys.version_info >= (3, 11):
        assert any("item 7 on rank" in n for n in info.value.__notes__)


def test_errors_return_puts_exceptions_in_place(engine):
    out = mpimap.pmap(boom_at, range(10), errors="return")
    assert out[:7] == list(range(7)) and out[8:] == [8, 9]
    assert isinstance(out[7], Boom) and "item 7 on rank" in str(out[7].__cause__)


def test_fail_fast_cancels_and_the_pool_stays_usable(engine):
    t0 = time.monotonic()
    with pytest.raises(Boom):
        mpimap.pmap(slow_unless_zero, range(200), chunksize=1)
    # 200 items x 50 ms / 2 workers would take 5 s; fail fast must not wait for them all.
    assert time.monotonic() - t0 < 3
    assert mpimap.pmap(square, range(100)) == [x * x for x in range(100)]


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(engine):
    with pytest.raises(mpimap.RemoteError) as info:
        mpimap.pmap(raise_needs_two, [1])
    err = info.value
    assert err.type_name.endswith("NeedsTwo") and "1/extra" in err.message
    assert "raise_needs_two" in err.remote_traceback


def test_exception_that_cannot_be_pickled_becomes_remote_error(engine):
    with pytest.raises(mpimap.RemoteError) as info:
        mpimap.pmap(raise_holds_generator, [1])
    err = info.value
    assert err.type_name.endswith("HoldsGenerator") and "has a generator" in err.message


def test_unpicklable_result_names_the_item(engine):
    with pytest.raises(mpimap.SerializationError, match=r"result of item 3 .*generator"):
        mpimap.pmap(return_generator, range(6))
    out = mpimap.pmap(return_generator, range(6), errors="return")
    assert out[:3] == [0, 1, 2] and isinstance(out[3], mpimap.SerializationError)


def test_unpicklable_item_names_the_item(engine):
    items = [1, 2, (i for i in range(2)), 4]
    with pytest.raises(mpimap.SerializationError, match=r"item 2 .*generator"):
        mpimap.pmap(square, items, chunksize=1)


GLOBAL_GEN = (i for i in range(3))


def uses_global_generator(x):
    return next(GLOBAL_GEN, x)


def test_unpicklable_function_names_the_global(engine, monkeypatch):
    # A function defined in a module pickles by reference; force by-value as for a script.
    monkeypatch.setattr(uses_global_generator, "__module__", "__main__")
    with pytest.raises(mpimap.SerializationError, match=r"global `GLOBAL_GEN`"):
        mpimap.pmap(uses_global_generator, [1])


class FailsOnWorker:
    """Unpickles on rank 0 (the test's main thread) but not on a worker thread."""

    def __reduce__(self):
        return (_rebuild_fails_on_worker, ())


def _rebuild_fails_on_worker():
    if threading.current_thread().name.startswith("mpimap-inproc"):
        raise ImportError("No module named 'only_on_rank0'")
    return FailsOnWorker()


def test_function_that_cannot_load_on_a_worker(engine):
    trap = FailsOnWorker()
    with pytest.raises(mpimap.SerializationError, match=r"could not be loaded on rank \d.*only_on_rank0"):
        mpimap.pmap(lambda x: (trap, x)[1], [1, 2])


class FailsOnRank0:
    def __reduce__(self):
        return (_rebuild_fails_on_rank0, ())


def _rebuild_fails_on_rank0():
    if threading.current_thread() is threading.main_thread():
        raise ValueError("cannot rebuild here")
    return FailsOnRank0()


def test_result_that_cannot_be_rebuilt_on_rank0(engine):
    with pytest.raises(mpimap.SerializationError, match=r"results of items .*rank 0.*cannot rebuild"):
        mpimap.pmap(lambda x: FailsOnRank0(), [1])


def test_lost_worker_is_reported_with_rank_and_items(make_engine):
    engine = make_engine(2)
    hub = engine.hub
    started = threading.Event()

    def stall(x):
        started.set()
        time.sleep(0.3)
        return x

    killer = threading.Timer(0.1, lambda: hub.kill(1, "killed by signal SIGKILL"))
    killer.start()
    with pytest.raises(mpimap.WorkerLostError) as info:
        mpimap.pmap(stall, range(8), chunksize=2)
    err = info.value
    assert err.rank == 1 and err.items and "rank 1" in str(err) and "SIGKILL" in str(err)
    assert set(err.items) <= set(range(8))
    # The other worker carries on.
    assert mpimap.pmap(square, range(20)) == [x * x for x in range(20)]
    assert engine.nworkers == 1


def test_imap_reads_a_generator_lazily(engine):
    pulled = [0]

    def gen():
        for i in range(1_000_000):
            pulled[0] += 1
            yield i

    out = []
    worst = 0
    for r in mpimap.imap(square, gen()):
        out.append(r)
        worst = max(worst, pulled[0] - len(out))
        if len(out) == 20_000:
            break
    assert out == [x * x for x in range(20_000)]
    # The automatic bound: 4 chunks per held chunk slot of every worker, chunks of at most
    # UNKNOWN_LENGTH_MAX items for an input of unknown length, plus the chunk being consumed.
    bound = (4 * engine.nworkers * engine.cfg["MPIMAP_PREFETCH"] + 1) * UNKNOWN_LENGTH_MAX
    assert worst <= bound, f"imap read {worst} items ahead of the consumer"
    assert pulled[0] <= 20_000 + bound < 1_000_000
    assert mpimap.pmap(square, range(5)) == [0, 1, 4, 9, 16]


def test_two_open_imaps_interleave(engine):
    a = mpimap.imap(square, range(500))
    b = mpimap.imap(add3, range(500), range(500), range(500))
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == i * i and y == 3 * i


def test_common_is_read_only_in_parallel_and_serial(engine):
    common = {"grid": np.arange(10.0), "table": [1, 2], "scale": 2.0}

    def mutate(kind, c):
        try:
            if kind == "array":
                c["grid"][0] = 5
            elif kind == "dict":
                c["new"] = 1
            else:
                c["table"].append(3)
        except (ValueError, TypeError) as exc:
            return type(exc).__name__
        return "mutated"

    kinds = ["array", "dict", "list"]
    assert mpimap.pmap(mutate, kinds, common=common) == ["ValueError", "TypeError", "TypeError"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPIMAP_SERIAL", "1")
        assert mpimap.pmap(mutate, kinds, common=common) == ["ValueError", "TypeError",
                                                            "TypeError"]
    assert common["grid"][0] == 0 and common["grid"].flags.writeable  # the caller's data


def test_rng_depends_only_on_seed_and_index(make_engine, monkeypatch):
    def draw(x):
        return float(mpimap.rng().random()) + x

    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    serial = mpimap.pmap(draw, range(40), seed=42)
    monkeypatch.delenv("MPIMAP_SERIAL")
    make_engine(2)
    two = mpimap.pmap(draw, range(40), seed=42, chunksize=3)
    make_engine(3)
    three = mpimap.pmap(draw, range(40), seed=42)
    assert serial == two == three
    assert mpimap.pmap(draw, range(40), seed=43) != three
    with pytest.raises(mpimap.MpimapError, match="seed"):
        mpimap.pmap(draw, [1])


def test_task_info_inside_and_outside(engine):
    assert mpimap.pmap(lambda x: mpimap.task().index, range(300)) == list(range(300))
    ranks = set(mpimap.pmap(lambda x: mpimap.task().rank, range(300), chunksize=1))
    assert ranks <= {1, 2}
    with pytest.raises(mpimap.MpimapError, match="only available inside"):
        mpimap.task()


def test_nested_pmap_runs_serially_inside_the_task(engine):
    def outer(x):
        inner = mpimap.pmap(square, range(x))
        return sum(inner), mpimap.task().rank

    out = mpimap.pmap(outer, [3, 4, 5])
    assert [s for s, _ in out] == [5, 14, 30]


class Counter:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_progress_object_is_updated_for_every_item(engine):
    bar = Counter()
    mpimap.pmap(square, range(123), progress=bar)
    assert bar.n == 123


def test_fixed_chunksize_is_respected(engine):
    sizes = []
    original = engine._send_chunk

    def spy(job, w, items):
        sizes.append(len(items))
        return original(job, w, items)

    engine._send_chunk = spy
    mpimap.pmap(square, range(100), chunksize=7)
    assert sizes[:-1] == [7] * 14 and sizes[-1] == 2


SCALE = 3


def scaled(x):
    return x * SCALE


def test_warm_pool_reuses_function_and_notices_changes(engine, monkeypatch):
    monkeypatch.setattr(scaled, "__module__", "__main__")  # by value, as from a script
    calls = []
    real = _serial.dumps_code
    monkeypatch.setattr(_serial, "dumps_code", lambda *a: calls.append(1) or real(*a))
    with mpimap.Pool() as pool:
        assert pool.map(scaled, [1, 2]) == [3, 6]
        assert pool.map(scaled, [1, 2]) == [3, 6]
        assert len(calls) == 1  # the second map reused the function already on the workers
        monkeypatch.setitem(globals(), "SCALE", 10)
        assert pool.map(scaled, [1, 2]) == [10, 20]  # a rebound global is noticed
        assert len(calls) == 2


INIT_SEEN = []


def record_init(tag):
    INIT_SEEN.append((tag, threading.current_thread().name))


def test_pool_common_and_initializer(engine):
    INIT_SEEN.clear()
    with mpimap.Pool(common=np.arange(5), initializer=record_init, initargs=("hi",)) as pool:
        assert pool.map(lambda x, c: int(c[x]), range(5)) == list(range(5))
        assert pool.map(lambda x, c: int(c[x]) * 2, range(5)) == [0, 2, 4, 6, 8]
        assert pool.size == 2
    # once per worker, not per map
    assert sorted(INIT_SEEN) == [("hi", "mpimap-inproc-1"), ("hi", "mpimap-inproc-2")]


def failing_init():
    raise RuntimeError("init exploded")


def test_pool_initializer_failure_raises_at_creation(engine):
    with pytest.raises(mpimap.MpimapError, match="init exploded"):
        mpimap.Pool(initializer=failing_init)
    assert mpimap.pmap(square, [2]) == [4]
