"""Serialisation: codecs, out-of-band arrays, change detection, read-only common data."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpimap import _serial
from mpimap._serial import (CODEC_DILL, CODEC_PICKLE, ReadOnlyDict, ReadOnlyList, ReadOnlySet,
                            dumps_code, dumps_data, fingerprint, freeze, loads, roundtrip,
                            same_fingerprint)


class Point:
    def __init__(self, x):
        self.x = x


def test_plain_data_uses_c_pickle_and_arrays_go_out_of_band():
    arr = np.arange(100_000, dtype=np.float64)
    packed = dumps_data({"a": arr, "n": 3}, to_worker=True)
    assert packed.codec == CODEC_PICKLE
    assert len(packed.data) < 1000, "the array must not be copied into the pickle stream"
    assert sum(memoryview(b).nbytes for b in packed.buffers) == arr.nbytes
    back = roundtrip(packed)
    np.testing.assert_array_equal(back["a"], arr)


def test_arrays_rebuild_zero_copy_and_read_only_when_asked():
    arr = np.arange(1000.0)
    packed = dumps_data(arr, to_worker=True)
    back = roundtrip(packed, readonly=True)
    assert not back.flags.writeable
    with pytest.raises(ValueError):
        back[0] = 1
    assert np.shares_memory(back, arr)  # rebuilt on the same buffer, no copy


def test_lambdas_fall_back_to_dill_on_the_same_path():
    packed = dumps_data([lambda x: x + 1], to_worker=False)
    assert packed.codec == CODEC_DILL
    (f,) = roundtrip(packed)
    assert f(1) == 2


def test_dill_path_keeps_arrays_out_of_band():
    arr = np.ones(50_000)
    packed = dumps_code(lambda: arr.sum(), "f")
    assert packed.codec == CODEC_DILL
    assert len(packed.data) < 5000 and sum(memoryview(b).nbytes for b in packed.buffers) == arr.nbytes
    assert roundtrip(packed)() == 50_000


def test_main_references_go_to_workers_by_value(monkeypatch):
    monkeypatch.setattr(Point, "__module__", "__main__")
    monkeypatch.setitem(sys.modules["__main__"].__dict__, "Point", Point)
    # Plain pickle would write a reference to __main__.Point: a worker's __main__ lacks it.
    assert dumps_data(Point(1), to_worker=True).codec == CODEC_DILL
    # Towards rank 0 the reference is what we want.
    assert dumps_data(Point(1), to_worker=False).codec == CODEC_PICKLE


def test_modules_are_pickled_by_name_not_by_value():
    import mpimap._schedule as mod

    packed = dumps_code(lambda: mod.CHUNK_BYTES, "f")
    assert b"_batch_setitems" not in packed.data and len(packed.data) < 2000
    assert roundtrip(packed)() == mod.CHUNK_BYTES


def test_unpicklable_capture_is_named():
    gen = (i for i in range(3))

    def f(x):
        return next(gen)

    with pytest.raises(_serial.SerializationError, match="closure variable `gen`"):
        dumps_code(f, "the function `f`")


def test_fingerprint_notices_rebound_globals_and_closures():
    namespace = {"K": 1}
    exec("def f(x):\n    return x * K\n", namespace)
    f = namespace["f"]
    f.__module__ = "__main__"
    a = fingerprint(f)
    assert same_fingerprint(a, fingerprint(f))
    namespace["K"] = 2
    assert not same_fingerprint(a, fingerprint(f))

    def make(k):
        return lambda x: x + k

    assert same_fingerprint(fingerprint(make(1)), fingerprint(make(1)))  # same code, same value
    assert not same_fingerprint(fingerprint(make(1)), fingerprint(make(2)))


def test_fingerprint_compares_big_arrays_by_identity():
    big = np.zeros(100_000)
    f = lambda x: big[x]  # noqa: E731
    a = fingerprint(f)
    big[0] = 1  # in place: documented as not noticed
    assert same_fingerprint(a, fingerprint(f))
    big = np.zeros(100_000)  # rebound: noticed
    assert not same_fingerprint(a, fingerprint(f))


def test_freeze_makes_containers_and_arrays_read_only():
    data = freeze({"a": [1, {"b": np.arange(3)}], "s": {1, 2}, "t": (np.arange(2),)})
    assert isinstance(data, dict) and isinstance(data, ReadOnlyDict)
    with pytest.raises(TypeError, match="read-only"):
        data["x"] = 1
    with pytest.raises(TypeError):
        data["a"].append(3)
    assert isinstance(data["a"], ReadOnlyList)
    with pytest.raises(ValueError):
        data["a"][1]["b"][0] = 5
    assert isinstance(data["s"], ReadOnlySet)
    with pytest.raises(ValueError):
        data["t"][0][0] = 1
    # Copies and pickles are ordinary, writable containers.
    import copy
    import pickle

    assert type(copy.copy(data)) is dict and type(pickle.loads(pickle.dumps(data["a"]))) is list


def test_main_functions_and_classes_load_in_a_process_that_never_ran_the_script(tmp_path):
    """The cloudpickle habit: serialise in a real script's __main__, load elsewhere."""
    script = tmp_path / "make.py"
    script.write_text(textwrap.dedent("""
        import sys
        from mpimap import _serial
        class Thing:
            def __init__(self, v): self.v = v
        class Oops(Exception): pass
        OFFSET = 10
        def f(x):
            if x < 0:
                raise Oops("negative")
            return Thing(helper(x))
        def helper(x):  # defined after f, found at call time
            return x + OFFSET
        p = _serial.dumps_code(f, "f")
        sys.stdout.buffer.write(bytes([p.codec]) + p.data)
    """))
    blob = subprocess.run([sys.executable, str(script)], capture_output=True, check=True).stdout
    load = textwrap.dedent("""
        import sys
        from mpimap import _serial
        blob = sys.stdin.buffer.read()
        f = _serial.loads(blob[0], blob[1:])
        t = f(5)
        print(type(t).__name__, t.v)
        try:
            f(-1)
        except Exception as e:
            print(type(e).__name__, e)
    """)
    out = subprocess.run([sys.executable, "-c", load], input=blob, capture_output=True,
                         check=True).stdout.decode()
    assert out.split("\n")[:2] == ["Thing 15", "Oops negative"]


def test_loads_reconciles_by_value_main_classes_with_existing_ones(monkeypatch):
    main = sys.modules["__main__"]

    class Marker:
        pass

    Marker.__module__ = "__main__"
    Marker.__qualname__ = "Marker"
    monkeypatch.setattr(main, "Marker", Marker, raising=False)
    packed = _serial._dill_dumps(Marker())
    # dill sends the class by value; the receiver maps it to its own class of that name.
    assert type(loads(packed.codec, packed.data, packed.buffers)) is Marker
