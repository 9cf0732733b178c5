"""Node-shared segments without MPI: layout, memfd / file segments, mapping semantics, locators,
the probe, and the plan helpers the transport uses."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest

from mpimap import _nodeshare, _shm
from mpimap._transport import Frame, encode
from mpimap._serial import dumps_data

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux only")


def test_layout_aligns_every_buffer():
    offsets, total = _shm.layout([10, 64, 1, 100])
    assert offsets == [0, 64, 128, 192]
    assert total == 292
    assert all(o % _shm.ALIGN == 0 for o in offsets)
    assert _shm.layout([]) == ([], 0)


@pytest.mark.parametrize("kind", _shm.KINDS)
def test_segment_is_filled_with_pwrite_and_maps_read_only_elsewhere(kind):
    data = np.arange(300_000, dtype=np.float64)
    seg = _shm.Segment(kind, data.nbytes + 64)
    try:
        seg.write(64, data)
        loc = seg.locator()
        assert loc[0] == kind
        if kind == "file":
            assert os.path.basename(loc[1]).startswith(f"mpimap-{os.getuid()}-")
            assert oct(os.stat(loc[1]).st_mode & 0o777) == "0o600"
        mem = _shm.open_located(loc, "read")      # what another rank of the node does
        arr = np.frombuffer(memoryview(mem)[64:64 + data.nbytes], dtype=np.float64)
        assert np.array_equal(arr, data)
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1.0
        with pytest.raises(ValueError):
            arr.flags.writeable = True             # PROT_READ: cannot be made writeable
    finally:
        seg.release()
    assert _shm.leftovers() == []
    del arr
    mem.close()


def test_copy_access_is_private_copy_on_write():
    seg = _shm.Segment("memfd", 8192)
    try:
        seg.write(0, np.ones(1024))
        a = np.frombuffer(_shm.open_located(seg.locator(), "copy"), dtype=np.float64)
        b = np.frombuffer(_shm.open_located(seg.locator(), "copy"), dtype=np.float64)
        assert a.flags.writeable
        a[0] = 5.0                                  # this mapping's own page now
        assert b[0] == 1.0 and a[1] == 1.0
        r = np.frombuffer(_shm.open_located(seg.locator(), "read"), dtype=np.float64)
        assert r[0] == 1.0                          # the shared pages did not change
    finally:
        seg.release()


def test_a_released_or_replaced_segment_is_not_opened_by_mistake():
    seg = _shm.Segment("memfd", 4096)
    loc = seg.locator()
    seg.release()
    with pytest.raises(OSError):
        _shm.open_located(loc, "read")
    # the fd number reused by another file: the inode check refuses it
    other = _shm.Segment("memfd", 4096)
    try:
        forged = ("memfd", os.getpid(), other.fd, loc[3], 4096)
        with pytest.raises(OSError) as info:
            _shm.open_located(forged, "read")
        assert info.value.errno == errno.ESTALE
    finally:
        other.release()


def test_file_segment_name_goes_on_unlink_and_memory_with_the_mapping():
    seg = _shm.Segment("file", 4096)
    seg.write(0, b"x" * 4096)
    mem = _shm.open_located(seg.locator(), "read")
    assert _shm.leftovers() != []
    seg.release()
    assert _shm.leftovers() == []
    assert mem[:4] == b"xxxx"                       # the mapping keeps the pages
    mem.close()


def test_locator_round_trip_and_long_errors_fit():
    seg = _shm.Segment("memfd", 4096)
    try:
        buf = _shm.pack_locator(seg.locator())
        assert len(buf) == _shm.LOCATOR_BYTES
        assert _shm.unpack_locator(buf) == seg.locator()
    finally:
        seg.release()
    long = ("error", "x" * 5000)
    back = _shm.unpack_locator(_shm.pack_locator(long))
    assert back[0] == "error" and back[1].startswith("xxx") and len(back[1]) < 1000


def test_probe():
    for kind in _shm.KINDS:
        probe = _shm.probe_create(kind)
        try:
            assert probe.segment is not None
            assert _shm.probe_check(probe.locator) is None
        finally:
            probe.segment.release()
    assert _shm.probe_check(("error", "memfd: nope")) == "memfd: nope"
    assert _shm.leftovers() == []


def test_failing_pickle_raises_where_it_is_loaded():
    data = _shm.failing_pickle("no shared copy on node n2. Fix: ...")
    with pytest.raises(_shm.ShareUnavailable, match="no shared copy on node n2"):
        pickle.loads(data)


def test_plan_helpers_mark_array_buffers_not_pickle_streams():
    common = {"big": np.ones(200_000), "small": np.ones(10), "text": "x" * 100_000}
    frame = Frame(7, {"puts": [(1, "common", "common")]}, [dumps_data(common, True)])
    kinds: list = []
    head, bulk = encode(frame, 64 << 10, kinds)
    assert len(kinds) == len(bulk) == 2             # the pickle stream (text) and the big array
    assert kinds == [False, True]
    plan = {"size": 8, "place": [(1, 0, 8)]}
    back, rest = _nodeshare.split_plan(_nodeshare.pack_plan(plan) + b"HEAD")
    assert back == plan and bytes(rest) == b"HEAD"
    layout = [(0, [(1, 10), (0, 5), (1, 20)]), (0, [(1, 30)])]
    assert _nodeshare.payloads_of(layout, {1}) == {0}
    assert _nodeshare.payloads_of(layout, {2}) == {1}
    assert _nodeshare.payloads_of(layout, {0, 2}) == {0, 1}
