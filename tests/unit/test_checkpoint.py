"""checkpoint=: storage, resume, identity checks, recovery, load, info.

Most tests run twice: serially (MPIMAP_SERIAL=1) and on the in-process engine (worker threads,
the same Engine and bytes path as MPI). Tasks count their computations with marker files, so a
test can say which items a rerun computed. Kills, signals and Slurm are in tests/mpi and
tests/slurm; here a "killed run" is a copy of the files taken while a map was running.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid

import h5py
import numpy as np
import pytest
from testfiles import computed

import mpimap
from mpimap import _checkpoint, _checkpoint_io
from mpimap._schedule import ItemSource

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "golden")


@pytest.fixture(params=["serial", "engine"])
def mode(request, monkeypatch, make_engine):
    if request.param == "serial":
        monkeypatch.setenv("MPIMAP_SERIAL", "1")
    else:
        make_engine(2)
    return request.param


@pytest.fixture(autouse=True)
def _no_stop_left():
    yield
    _checkpoint._STOP.signum = None


def counted(marks, fn=None):
    """A task that leaves one marker file per computation of item x."""
    fn = fn or (lambda x: x * x)

    def task(x):
        open(os.path.join(marks, f"{x}.{uuid.uuid4().hex}"), "w").close()
        return fn(x)

    return task


@pytest.fixture
def marks(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    return str(d)


def reset(marks):
    for name in os.listdir(marks):
        os.unlink(os.path.join(marks, name))


# -- the file ------------------------------------------------------------------------------------

def test_results_are_native_hdf5_readable_without_mpimap(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    out = mpimap.pmap(counted(marks, lambda x: x / 2), range(100), checkpoint=path)
    assert out == [x / 2 for x in range(100)]
    assert sorted(os.listdir(tmp_path)) == ["marks", "run.h5"]   # journal, tmp, lock: gone
    with h5py.File(path, "r") as f:
        assert f["result"].dtype == np.float64 and f["result"].shape == (100,)
        assert np.array_equal(f["result"][:], np.arange(100) / 2)
        assert f["done"][:].all() and not f["failed"][:].any()
        assert f.attrs["total"] == 100 and f.attrs["done_count"] == 100
        assert f["item_digest"].shape == (100, 16)
    assert mpimap.load(path) == out


def test_tuples_dicts_arrays_and_a_pickled_fallback_column(mode, tmp_path):
    path = str(tmp_path / "run.h5")

    def f(x):
        if x == 3:
            return (x, np.zeros(5), 0.5)    # another shape: pickled, the map goes on
        if x == 4:
            return None
        return (x, np.full(3, x, np.float32), x * 0.5)

    out = mpimap.pmap(f, range(8), checkpoint=path)
    with h5py.File(path, "r") as f5:
        assert sorted(f5["result"]) == ["0", "1", "2"]
        assert f5["result/1"].shape == (8, 3) and f5["result/1"].dtype == np.float32
        assert f5["result/0"].dtype == np.int64
        assert list(f5["result_codec"][:]) == [0, 0, 0, 1, 1, 0, 0, 0]
        assert np.isnan(f5["result/2"][3])       # no native row where the result is pickled
    back = mpimap.load(path)
    for a, b in zip(back, out):
        if a is None:
            assert b is None
            continue
        assert type(a) is tuple and a[0] == b[0] and a[2] == b[2] and type(a[2]) is float
        assert np.array_equal(a[1], b[1]) and a[1].dtype == b[1].dtype


@pytest.mark.parametrize("value", [
    1, True, 1.5, 2 + 3j, np.float32(1.5), np.int16(7), np.arange(4.0).reshape(2, 2),
    np.array(3.0), {"a": 1.0, "b": np.arange(3)}, "text", [1, 2], 2 ** 70,
])
def test_every_kind_of_result_comes_back_as_it_went_in(tmp_path, monkeypatch, value):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")
    fn = lambda x: value  # noqa: E731  (one lambda: a lambda is identified by its source line)
    mpimap.pmap(fn, range(3), checkpoint=path)
    for got in mpimap.load(path) + mpimap.pmap(fn, range(3), checkpoint=path):
        assert type(got) is type(value)
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and got.shape == value.shape
            assert np.array_equal(got, value)
        elif isinstance(value, dict):
            assert list(got) == list(value) and np.array_equal(got["b"], value["b"])
        else:
            assert got == value


# -- resume ----------------------------------------------------------------------------------------

def test_a_rerun_computes_only_what_is_missing_in_input_order(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    task = counted(marks)
    it = mpimap.imap(task, range(60), checkpoint=path)
    first = [next(it) for _ in range(25)]
    it.close()                                       # left early: what arrived is saved
    assert first == [x * x for x in range(25)]
    before = computed(marks)
    assert set(range(25)) <= set(before)
    reset(marks)
    out = mpimap.pmap(task, range(60), checkpoint=path)
    assert out == [x * x for x in range(60)]
    again = computed(marks)
    assert not set(again) & {x for x in before if x < 25}, "finished items were computed again"
    assert set(again) | set(before) >= set(range(60))
    reset(marks)
    assert mpimap.pmap(task, range(60), checkpoint=path, ordered=False) == out
    assert computed(marks) == {}                     # all done: read back, nothing computed


def test_finished_items_scattered_through_the_input_keep_indices_and_rng(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")

    def draw(x):
        return (mpimap.task().index, float(mpimap.rng().random()))

    full = mpimap.pmap(draw, range(40), seed=7)
    session = _checkpoint_io.open_map(_checkpoint.spec(path), draw, ItemSource([range(40)]),
                                      seed=7)
    assert session.source.take(40) == range(40)       # all handed out...
    for i in range(0, 40, 3):                        # ...every third one came back
        session.record(i, [full[i]])
    session.close()
    assert mpimap.pmap(draw, range(40), seed=7, checkpoint=path) == full


def test_generator_input_resumes_and_the_total_is_learnt(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    task = counted(marks)
    it = mpimap.imap(task, (x for x in range(3000)), checkpoint=path)
    assert [next(it) for _ in range(10)] == [x * x for x in range(10)]
    it.close()                              # (serial mode reads 1024 items at a time)
    assert "total is not known yet" in _checkpoint.info(path)
    reset(marks)
    assert list(mpimap.imap(task, (x for x in range(3000)), checkpoint=path)) == \
        [x * x for x in range(3000)]
    assert not set(computed(marks)) & set(range(10))
    assert "3,000 of 3,000 items done" in _checkpoint.info(path)


def test_pool_map_and_imap_unordered_with_a_checkpoint(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    add = counted(marks, lambda x: x)

    def task(x, c):
        return add(x) + c

    with mpimap.Pool(common=10) as pool:
        out = pool.map(task, range(20), checkpoint=path)
        assert out == [x + 10 for x in range(20)]
    reset(marks)
    with mpimap.Pool(common=10) as pool:
        assert sorted(pool.imap_unordered(task, range(20), checkpoint=path)) == out
    assert computed(marks) == {}
    with mpimap.Pool(common=11) as pool:                   # another common: another map
        with pytest.raises(mpimap.CheckpointError, match="Pool's common data"):
            pool.map(task, range(20), checkpoint=path)


# -- failures --------------------------------------------------------------------------------------

def test_errors_return_are_recorded_and_retried(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    flaky = os.path.join(marks, "..", "flaky")

    def f(x):
        if x % 10 == 3 and not os.path.exists(flaky):
            raise ValueError(f"bad {x}")
        return x

    out = mpimap.pmap(counted(marks, f), range(30), checkpoint=path, errors="return")
    assert [type(v).__name__ for v in out[:4]] == ["int", "int", "int", "ValueError"]
    text = _checkpoint.info(path)
    assert "27 of 30 items done" in text and "3 failed" in text
    assert "ValueError x3 (items 3, 13, 23): bad 3" in text
    with h5py.File(path, "r") as f5:
        assert list(f5["errors/index"][:]) == [3, 13, 23]
        assert f5["errors/type"].asstr()[0] == "ValueError"
        assert "bad 13" in f5["errors/traceback"].asstr()[1]
    back = mpimap.load(path)
    assert isinstance(back[13], ValueError) and str(back[13]) == "bad 13"
    # final: the recorded exceptions come back without computing anything
    reset(marks)
    keep = mpimap.Checkpoint(path, retry_failed=False)
    again = mpimap.pmap(counted(marks, f), range(30), checkpoint=keep, errors="return")
    assert computed(marks) == {} and isinstance(again[23], ValueError)
    with pytest.raises(ValueError, match="bad 3"):
        mpimap.pmap(counted(marks, f), range(30), checkpoint=keep)
    # retried (the default): only the failed items run again, and now succeed
    open(flaky, "w").close()
    reset(marks)
    assert mpimap.pmap(counted(marks, f), range(30), checkpoint=path) == list(range(30))
    assert computed(marks) == {3: 1, 13: 1, 23: 1}
    assert "30 of 30 items done (100.0%), 0 failed" in _checkpoint.info(path)


def test_errors_raise_keeps_what_finished_before_the_failure(tmp_path, marks, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")

    def f(x):
        if x == 12:
            raise KeyError("twelve")
        return x

    with pytest.raises(KeyError):
        mpimap.pmap(counted(marks, f), range(20), checkpoint=path)
    assert "12 of 20 items done" in _checkpoint.info(path)


# -- identity --------------------------------------------------------------------------------------

def test_another_function_common_seed_or_input_is_refused_with_the_fix(mode, tmp_path, marks):
    path = str(tmp_path / "run.h5")
    scale = 2

    def f(x, c=None):
        return x * scale

    mpimap.pmap(f, range(10), checkpoint=path, seed=1)
    with pytest.raises(mpimap.CheckpointError) as info:
        mpimap.pmap(lambda x: x + 1, range(10), checkpoint=path, seed=1)
    text = str(info.value)
    assert "the function: it was made by `test_another_function_common_seed_or_input_is_" \
           "refused_with_the_fix.<locals>.f`" in text
    assert "delete " + path in text and 'mismatch="resume"' in text
    scale = 3    # a value the function reads (its closure)
    with pytest.raises(mpimap.CheckpointError, match="a value it reads"):
        mpimap.pmap(f, range(10), checkpoint=path, seed=1)
    scale = 2
    with pytest.raises(mpimap.CheckpointError, match="seed: it was made with seed=1"):
        mpimap.pmap(f, range(10), checkpoint=path, seed=2)
    with pytest.raises(mpimap.CheckpointError, match="common: it was made without common"):
        mpimap.pmap(f, range(10), checkpoint=path, seed=1, common=5)
    with pytest.raises(mpimap.CheckpointError, match="has 11 items; the checkpoint was made "
                                                     "for 10"):
        mpimap.pmap(f, range(11), checkpoint=path, seed=1)
    items = list(range(10))
    items[4] = 40
    with pytest.raises(mpimap.CheckpointError, match=r"input of item\(s\) 4 differs"):
        mpimap.pmap(f, items, checkpoint=path, seed=1)
    assert mpimap.pmap(f, range(10), checkpoint=path, seed=1) == [x * 2 for x in range(10)]


def test_mismatch_resume_recomputes_only_changed_items(mode, tmp_path, marks, capfd):
    path = str(tmp_path / "run.h5")
    task = counted(marks, lambda x: -x)
    mpimap.pmap(task, [1, 2, 3, 4, 5, 6], checkpoint=path)
    reset(marks)
    resume = mpimap.Checkpoint(path, mismatch="resume")
    assert mpimap.pmap(task, [1, 2, 30, 4, 50, 6], checkpoint=resume) == [-1, -2, -30, -4, -50,
                                                                           -6]
    assert computed(marks) == {30: 1, 50: 1}
    assert "resuming anyway" in capfd.readouterr().err
    # the file now belongs to the new inputs
    reset(marks)
    mpimap.pmap(task, [1, 2, 30, 4, 50, 6], checkpoint=path)
    assert computed(marks) == {}


def test_changed_generator_item_stops_the_map_and_keeps_results(tmp_path, marks, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")
    task = counted(marks)
    mpimap.pmap(task, (x for x in range(10)), checkpoint=path)
    with pytest.raises(mpimap.CheckpointError, match=r"input of item\(s\) 5 differs"):
        mpimap.pmap(task, (x if x != 5 else 99 for x in range(10)), checkpoint=path)
    assert mpimap.load(path) == [x * x for x in range(10)]


# -- crashes ---------------------------------------------------------------------------------------

def _killed_copy(tmp_path, make, name="killed"):
    """The files of a checkpoint as a kill -9 would leave them: copied while the map runs."""
    src = tmp_path / "live"
    src.mkdir()
    dst = tmp_path / name
    path = str(src / "run.h5")
    session = make(path)
    session.journal._cycle()                        # what the flush thread does every second
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    session.close()
    return str(dst / "run.h5")


def _task_array(x):
    return np.full(40000, float(x))   # 320 kB: written once, a row the journal points at


def _times(x):
    return x * 1.5


def _partial(path, n=50, done=30, func=_task_array, ranks=1):
    """A session that recorded ``done`` of ``n`` results of ``func`` and is still open
    (``ranks`` > 1: as rank 0 of an MPI run records them)."""
    session = _checkpoint_io.open_map(_checkpoint.spec(path), func, ItemSource([range(n)]),
                                      ranks=ranks)
    src = session.source
    while src.taken < done:
        items = src.take(min(7, done - src.taken))
        start = src.taken - len(items)
        session.record(start, [func(x) for x in items])
    return session


@pytest.mark.parametrize("func", [_task_array, _times], ids=["array-rows", "floats-batched"])
@pytest.mark.parametrize("ranks", [1, 3], ids=["serial", "engine"])
def test_a_killed_run_is_recovered_from_its_journal(tmp_path, monkeypatch, capfd, func, ranks):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = _killed_copy(tmp_path, lambda p: _partial(p, func=func, ranks=ranks))
    folder = os.path.dirname(path)
    assert not os.path.exists(path)                        # never closed: no run.h5 yet
    assert any(n.startswith("run.h5.tmp-") for n in os.listdir(folder))
    text = _checkpoint.info(path)
    assert "30 of 50 items done" in text and "not yet in run.h5" in text
    got = mpimap.load(path)
    assert all(np.array_equal(got[x], func(x)) for x in range(30))
    assert got[30] is mpimap.MISSING
    out = mpimap.pmap(func, range(50), checkpoint=path)
    assert all(np.array_equal(a, func(i)) for i, a in enumerate(out))
    assert "30 result(s) that a killed run left in run.h5.journal were folded" in \
        capfd.readouterr().err
    assert sorted(os.listdir(folder)) == ["run.h5"]
    assert "killed (kill -9" in _checkpoint.info(path)


@pytest.mark.parametrize("cut", [1, 7, 33, 200, "half"])
def test_a_journal_torn_at_any_byte_loses_only_its_last_records(tmp_path, monkeypatch, cut):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    monkeypatch.setenv("MPIMAP_CHECKPOINT_FLUSH", "0")      # a record per result
    path = _killed_copy(tmp_path, lambda p: _partial(p, n=40, done=40, func=_times))
    journal = path + ".journal"
    size = os.path.getsize(journal)
    with open(journal, "r+b") as fh:
        fh.truncate(size - (size // 2 if cut == "half" else cut))
    got = mpimap.load(path)
    done = [i for i, v in enumerate(got) if v is not mpimap.MISSING]
    assert done == list(range(len(done))) and len(done) < 40
    assert all(got[i] == i * 1.5 for i in done)
    assert mpimap.pmap(_times, range(40), checkpoint=path) == [x * 1.5 for x in range(40)]


def test_garbage_in_the_journal_is_cut_at_the_last_good_record(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    monkeypatch.setenv("MPIMAP_CHECKPOINT_FLUSH", "0")      # a record per result
    path = _killed_copy(tmp_path, lambda p: _partial(p, n=40, done=40, func=float))
    journal = path + ".journal"
    data = bytearray(open(journal, "rb").read())
    data[len(data) // 2] ^= 0xFF                      # a flipped bit in the middle
    open(journal, "wb").write(bytes(data))
    got = mpimap.load(path)
    k = sum(v is not mpimap.MISSING for v in got)
    assert 0 < k < 40 and got[:k] == [float(x) for x in range(k)]


def test_a_damaged_run_h5_never_stops_the_user(mode, tmp_path, marks, capfd):
    path = str(tmp_path / "run.h5")
    task = counted(marks)
    mpimap.pmap(task, range(20), checkpoint=path)
    with open(path, "r+b") as fh:                    # a copy cut short / a disk error
        fh.truncate(os.path.getsize(path) // 3)
    reset(marks)
    assert mpimap.pmap(task, range(20), checkpoint=path) == [x * x for x in range(20)]
    err = capfd.readouterr().err
    assert "could not be read" in err and "run.h5.corrupt-" in err
    assert len(computed(marks)) == 20
    assert any(n.startswith("run.h5.corrupt-") for n in os.listdir(tmp_path))


def test_a_damaged_run_h5_next_to_a_journal_keeps_what_the_journal_holds(tmp_path,
                                                                         monkeypatch, capfd):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = _killed_copy(tmp_path, lambda p: _partial(p, n=50, done=30))
    with open(path, "wb") as fh:                     # an unreadable run.h5 appears
        fh.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert "cannot be read" in _checkpoint.info(path)
    got = mpimap.pmap(_task_array, range(50), checkpoint=path)
    assert all(np.array_equal(a, np.full(40000, float(i))) for i, a in enumerate(got))
    assert "moved to run.h5.corrupt-" in capfd.readouterr().err
    assert ": 20 new result(s); complete" in _checkpoint.info(path)   # only the missing 20


def test_two_runs_cannot_write_one_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")
    it = mpimap.imap(float, range(10), checkpoint=path)
    next(it)
    with pytest.raises(mpimap.CheckpointError, match=r"in use by another run \(pid \d+"):
        mpimap.pmap(float, range(10), checkpoint=path)
    it.close()
    assert mpimap.pmap(float, range(10), checkpoint=path) == [float(x) for x in range(10)]


def test_a_pickled_result_that_cannot_be_read_back_is_reported_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "gone_module.py").write_text("class Thing:\n    def __init__(self, v):\n"
                                          "        self.v = v\n")
    monkeypatch.syspath_prepend(str(moddir))
    import gone_module

    path = str(tmp_path / "run.h5")
    mpimap.pmap(gone_module.Thing, range(3), checkpoint=path)
    monkeypatch.delitem(__import__("sys").modules, "gone_module")
    (moddir / "gone_module.py").unlink()
    with pytest.raises(mpimap.CheckpointError) as info:
        mpimap.load(path)
    text = str(info.value)
    assert "item 0" in text and "stored pickled and cannot be read back" in text
    assert "ModuleNotFoundError" in text and "It was written with mpimap " in text
    assert "Python " in text and "dill " in text and "numpy " in text


def test_an_unpicklable_result_in_serial_mode_is_computed_again_later(tmp_path, monkeypatch,
                                                                       capfd):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")
    out = mpimap.pmap(lambda x: (y for y in range(x)) if x == 2 else x, range(4),
                      checkpoint=path)
    assert out[3] == 3
    assert "cannot be stored" in capfd.readouterr().err
    assert mpimap.load(path)[2] is mpimap.MISSING


# -- signals ---------------------------------------------------------------------------------------

def test_sigterm_saves_what_finished_and_exits_143(mode, tmp_path, marks, capfd):
    path = str(tmp_path / "run.h5")

    def f(x):
        if x == 15:
            os.kill(os.getpid(), signal.SIGTERM)     # what scancel does
        return x + 0.5

    with pytest.raises(SystemExit) as info:
        mpimap.pmap(counted(marks, f), range(400), checkpoint=path)
    assert info.value.code == 143
    err = capfd.readouterr().err
    assert "SIGTERM received:" in err and "rerun to resume" in err
    done = mpimap.load(path)
    k = sum(v is not mpimap.MISSING for v in done)
    assert 15 <= k < 400
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # restored after the map
    reset(marks)
    assert mpimap.pmap(counted(marks, f), range(400), checkpoint=path) == \
        [x + 0.5 for x in range(400)]
    assert len(computed(marks)) == 400 - k


def test_sigint_is_a_keyboardinterrupt_after_saving(tmp_path, marks, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")

    def f(x):
        if x == 5:
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C
        return x

    with pytest.raises(KeyboardInterrupt):
        mpimap.pmap(counted(marks, f), range(50), checkpoint=path)
    assert "6 of 50 items done" in _checkpoint.info(path)
    assert "stopped by SIGINT" in _checkpoint.info(path)
    # interrupted once (a Jupyter kernel): the next map runs, and resumes
    assert mpimap.pmap(counted(marks, f), range(50), checkpoint=path) == list(range(50))


def test_a_script_handler_is_left_alone(tmp_path, marks, monkeypatch):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    got = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        def f(x):
            if x == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return x

        assert mpimap.pmap(f, range(6), checkpoint=str(tmp_path / "r.h5")) == list(range(6))
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- golden files: checkpoints written by earlier versions still resume ----------------------------

def golden_task(x):
    """The task of tests/golden/checkpoint_v1.h5 (see make_checkpoint_golden.py there): do not
    change it, or the golden file stops matching it."""
    if x % 7 == 3:
        raise ValueError(f"golden failure {x}")
    if x % 5 == 4:
        return {"x": x, "label": f"item {x}"}
    return (x, np.arange(3, dtype=np.float32) * x, x / 4)


def test_golden_checkpoint_v1_loads_and_resumes(tmp_path, monkeypatch, marks):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "checkpoint_v1.h5")
    shutil.copy(os.path.join(GOLDEN, "checkpoint_v1.h5"), path)
    stored = mpimap.load(path)
    assert len(stored) == 40
    assert stored[30:] == [mpimap.MISSING] * 10              # written as a partial run
    for x, v in enumerate(stored[:30]):
        if x % 7 == 3:
            assert isinstance(v, ValueError) and str(v) == f"golden failure {x}"
        elif x % 5 == 4:
            assert v == {"x": x, "label": f"item {x}"}
        else:
            assert v[0] == x and v[2] == x / 4 and np.array_equal(v[1], np.arange(3) * x)
    assert "26 of 40 items done (65.0%), 4 failed, 10 missing" in _checkpoint.info(path)
    out = mpimap.pmap(golden_task, range(40), checkpoint=path, errors="return")
    # only the 10 missing items and the 4 failed ones (retried) were computed
    assert "run 2" in _checkpoint.info(path)
    assert ": 14 new result(s); complete, 6 failed" in _checkpoint.info(path)
    for x, v in enumerate(out):
        want = golden_task(x) if x % 7 != 3 else None
        if want is None:
            assert isinstance(v, ValueError)
        elif isinstance(want, dict):
            assert v == want
        else:
            assert v[0] == want[0] and np.array_equal(v[1], want[1])


def test_a_full_disk_does_not_lose_the_maps_results(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    monkeypatch.setenv("MPIMAP_CHECKPOINT_FLUSH", "0")      # a record per result
    path = str(tmp_path / "run.h5")
    append = _checkpoint_io._Journal.append
    calls = []

    def failing(self, meta, *a, **k):
        if meta.get("k") == "res":
            calls.append(1)
            if len(calls) > 10:
                raise OSError(28, "No space left on device")
        return append(self, meta, *a, **k)

    monkeypatch.setattr(_checkpoint_io._Journal, "append", failing)
    assert mpimap.pmap(_times, range(30), checkpoint=path) == [x * 1.5 for x in range(30)]
    assert "WITHOUT saving" in capfd.readouterr().err
    monkeypatch.setattr(_checkpoint_io._Journal, "append", append)
    assert mpimap.load(path)[:10] == [x * 1.5 for x in range(10)]   # kept for the next run
    assert mpimap.pmap(_times, range(30), checkpoint=path) == [x * 1.5 for x in range(30)]
    assert "30 of 30 items done" in _checkpoint.info(path)


def test_the_checkpoint_info_command(tmp_path, monkeypatch, capsys):
    from mpimap import cli

    monkeypatch.setenv("MPIMAP_SERIAL", "1")
    path = str(tmp_path / "run.h5")
    mpimap.pmap(_times, range(12), checkpoint=path)
    assert cli.main(["checkpoint", "info", path]) == 0
    out = capsys.readouterr().out
    assert "12 of 12 items done (100.0%), 0 failed, 0 missing" in out
    assert "`_times` (test_checkpoint.py:" in out and "layout     /result float64" in out
    assert "written by mpimap " in out and "dill " in out and "numpy " in out
    assert cli.main(["checkpoint", "info", str(tmp_path / "nothing.h5")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
