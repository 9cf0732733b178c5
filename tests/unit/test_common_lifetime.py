"""How long rank 0 keeps large objects on the workers (in-process engine, no MPI): per-map common
data for its map, a Pool's for the pool, functions carrying large arrays for their map or pool."""

from __future__ import annotations

import numpy as np

import mpimap


def add_len(x, common):
    return x + len(common)


def held(engine, oid) -> bool:
    return oid in engine.objects or any(oid in w.objects for w in engine.workers.values())


def test_per_map_common_goes_with_its_map_even_from_workers_without_chunks(make_engine):
    engine = make_engine(3)
    engine.cfg["MPIMAP_BCAST_MIN"] = 1           # broadcast to every worker at the start
    assert mpimap.pmap(add_len, [1], common=np.arange(10)) == [11]   # one item, three workers
    kept = set().union(*(w.objects for w in engine.workers.values()))
    assert kept and all(engine.objects[oid].role == "code" for oid in kept)   # the function only
    assert all(o.role != "common" for o in engine.objects.values())


def test_pool_closed_while_its_imap_is_open_frees_its_data_when_the_map_ends(engine):
    pool = mpimap.Pool(common=np.arange(10))
    common_id = pool._handle[1].id
    it = pool.imap(add_len, range(20), chunksize=1)
    assert next(it) == 10
    pool.close()
    assert held(engine, common_id)                # the open map still uses it
    assert list(it) == list(range(11, 30))
    assert not held(engine, common_id)


def test_a_function_carrying_large_arrays_is_held_for_its_map_or_its_pool(engine):
    engine.cfg["MPIMAP_SHARE_MIN"] = 4096
    table = np.arange(1000, dtype=np.float64)     # 8000 bytes: "large" here

    def lookup(i):
        return float(table[i])

    def small(i):
        return i

    assert mpimap.pmap(lookup, [3, 4]) == [3.0, 4.0]
    assert not any(o.role == "code" and o.packed.nbytes >= 4096 for o in engine.objects.values())
    assert mpimap.pmap(small, [1]) == [1]
    small_ids = [o.id for o in engine.objects.values() if o.role == "code"]
    assert small_ids                               # small functions stay cached

    with mpimap.Pool() as pool:
        assert pool.map(lookup, [1]) == [1.0]
        ids = {o.id for o in engine.objects.values() if o.packed.nbytes >= 4096}
        assert len(ids) == 1
        assert pool.map(lookup, [2]) == [2.0]     # the pool reuses it: not resent
        assert {o.id for o in engine.objects.values() if o.packed.nbytes >= 4096} == ids
    (oid,) = ids
    assert not held(engine, oid)
    assert all(held(engine, s) for s in small_ids)
