"""Which side of the wire this process is on, and how a run starts and ends.

Three ways a map can run, decided at the first map (or by ``python -m mpimap``):

* serial: no launcher (plain ``python script.py``), a world of one rank, inside a running task
  (a nested pmap), or MPIMAP_SERIAL=1. Same semantics, in-process.
* module mode: ``mpiexec -n N python -m mpimap script.py``. Rank 0 runs the script as
  ``__main__``; ranks 1.. never run it: they serve maps until rank 0's script ends.
* collective mode: ``mpiexec -n N python script.py`` -- every rank runs the script, and each
  pmap / imap / Pool call is collective: rank 0 drives with its own function, data and inputs, the
  other ranks serve that one call and then return ``None`` (imap: an empty iterator) and go on with
  the script.

Ending. An exception that escapes the script on any rank must end the whole job, never leave the
others waiting: in module mode rank 0 reports it, tells the workers to stop (aborting after
MPIMAP_SHUTDOWN_TIMEOUT if a worker is stuck in a task) and exits 1; whenever a launcher is visible
an exception hook prints the traceback and calls MPI_Abort.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time
import traceback
import types

from . import _serial, _task
from ._env import (announced_rank, knob, launch_mismatch, launched_world_size,
                   launcher_library_mismatch, worker_thread_env)

__all__ = ["executor", "install_excepthook", "main"]

_state = types.SimpleNamespace(mode=None, session=None, hub=None, engine=None, worker=None,
                               executor=None)


# ----------------------------------------------------------------------------------------------
# Executors: what runs a map called from here

class SerialExecutor:
    """In-process maps with the same semantics as the parallel ones."""

    nworkers = 1

    def open_pool(self, common, has_common, initializer, initargs):
        frozen = _freeze_common(common) if has_common else None
        if initializer is not None:
            initializer(*initargs)
        return ("serial", has_common, frozen)

    def close_pool(self, handle):
        pass

    def map(self, pool, func, iterables, **kw):
        return list(self.imap(pool, func, iterables, lazy=False, **kw))

    def imap(self, pool, func, iterables, *, common=None, has_common=False, chunksize=None,
             ordered=True, errors="raise", progress=False, seed=None, lazy=True, files=None,
             modules=None, checkpoint=None):
        from ._driver import _progress_bar
        from ._schedule import ItemSource

        if files is not None or modules is not None:
            # Tasks run in this very directory: nothing to stage, but the same bad input is
            # refused in every mode (a script that works serially must not fail on a cluster).
            from ._bundle import resolve_files
            from ._modules import resolve

            resolve_files(files, os.getcwd())
            resolve(modules)

        source = ItemSource(iterables)
        ck = None
        if checkpoint is not None:
            from . import _checkpoint

            ck = _checkpoint.open_map(checkpoint, func, source, common=common,
                                      has_common=has_common, seed=seed, errors=errors, ranks=1)
            source = ck.source
        if pool is not None and pool[1]:
            has_common, frozen = True, pool[2]
        elif has_common:
            frozen = _freeze_common(common)
        bar = _progress_bar(progress, source.length)
        return self._run(func, source, has_common, frozen if has_common else None, errors,
                         seed, bar, ck)

    @staticmethod
    def _run(func, source, has_common, common, errors, seed, bar, ck=None):
        star = source.nargs > 1
        outer = _task.current()
        start = 0
        sid = _task.serial_job()
        ready: list = []  # finished items read back from a checkpoint, in input order
        if ck is not None:
            def on_done(_start, values, failed):
                if failed and errors == "raise":
                    ck._fail(values[failed[0]])
                ready.append(values)
                return True

            ck.on_done = on_done
        failure = None
        try:
            while True:
                if ck is not None and ck.stop_signal() is not None:
                    return  # ck.close() saves, says so and raises the signal's exception
                items = source.take(1024)
                for values in ready:
                    if bar is not None:
                        bar.update(len(values))
                    yield from values
                ready.clear()
                if items is None:
                    return
                if ck is not None:
                    start = source.taken - len(items)
                out: list = []
                state = _task._Running(start, out, seed, 0, 1, _node_name(), _host_name(), 0,
                                       scratch_job=sid)
                for item in items:
                    args = item if star else (item,)
                    index = state.index
                    _task.begin(state)
                    try:
                        if ck is not None:
                            ck.set_in_task(True)
                        value = func(*args, common) if has_common else func(*args)
                    except Exception as exc:
                        if ck is not None:
                            ck.set_in_task(False)
                            ck.record(index, [exc], [(0, _type_name(exc), _safe_str(exc),
                                                      _format_exc(exc))])
                        if errors == "raise":
                            _note(exc, f"mpimap: raised by item {state.index} (serial, "
                                       f"in-process)")
                            raise
                        value = exc
                    else:
                        if ck is not None:
                            ck.set_in_task(False)
                            ck.record(index, [value])
                    finally:
                        _task.begin(outer)
                    out.append(value)
                    if bar is not None:
                        bar.update(1)
                    yield value
                    if ck is not None and ck.stop_signal() is not None:
                        return
                start += len(items)
        except GeneratorExit:
            raise  # the loop over imap() was left: not a failure
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _task.begin(outer)
            _task.remove_scratch(sid, 0)
            if bar is not None:
                bar.close()
            if ck is not None:
                ck.set_in_task(False)
                ck.close(failure)


def _type_name(exc) -> str:
    t = type(exc)
    return t.__qualname__ if t.__module__ in ("builtins", "__main__") else \
        f"{t.__module__}.{t.__qualname__}"


def _safe_str(exc) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"


def _format_exc(exc) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _note(exc, text):
    if hasattr(exc, "add_note"):
        try:
            exc.add_note(text)
        except Exception:
            pass


def _freeze_common(common):
    """Serial mode: the same read-only view of common the workers get, without copying arrays."""
    packed = _serial.dumps_data(common, to_worker=False)
    return _serial.freeze(_serial.roundtrip(packed, readonly=True))


def _host_name():
    import socket

    return socket.gethostname()


def _node_name():
    return os.environ.get("SLURMD_NODENAME") or _host_name()


class EngineExecutor:
    """Rank 0 driving workers through an Engine (module mode, collective mode, in-process)."""

    def __init__(self, engine, collective: bool = False):
        self.engine = engine
        self.collective = collective

    @property
    def nworkers(self):
        return self.engine.nworkers

    def _released(self):
        if self.collective:
            self.engine.release()

    def open_pool(self, common, has_common, initializer, initargs):
        try:
            pid, common_obj = self.engine.open_pool(common, initializer, initargs, has_common)
        finally:
            self._released()
        return (pid, common_obj)

    def close_pool(self, handle):
        try:
            self.engine.close_pool(*handle)
        finally:
            self._released()

    def _start(self, pool, func, iterables, lazy, **kw):
        common_obj = pool[1] if pool is not None else None
        return self.engine.start(func, iterables, common_obj=common_obj,
                                 per_map_common=kw.pop("common", None),
                                 has_common=kw.pop("has_common", False) or common_obj is not None,
                                 pool=None if pool is None else pool[0], lazy=lazy, **kw)

    def map(self, pool, func, iterables, **kw):
        try:
            job = self._start(pool, func, iterables, False, **kw)
            return self.engine.run(job)
        finally:
            self._released()

    def imap(self, pool, func, iterables, **kw):
        try:
            job = self._start(pool, func, iterables, True, **kw)
        except BaseException:
            self._released()
            raise
        return self._iterate(job)

    def _iterate(self, job):
        try:
            yield from self.engine.iterate(job)
        finally:
            self._released()


class CollectiveWorkerExecutor:
    """A non-root rank in collective mode: each call serves rank 0's map, then returns."""

    def __init__(self, worker):
        self.worker = worker

    @property
    def nworkers(self):
        return self.worker.ep.size

    def _serve(self):
        from ._mpi import RankZeroGone

        with _thread_limits():
            try:
                how = self.worker.serve()
            except RankZeroGone:
                _die("rank 0 has exited while this rank was serving it")
        if how == "shutdown":
            _exit_now(0)  # rank 0 is gone or leaving: never return into the script

    def open_pool(self, *args):
        self._serve()
        return None

    def close_pool(self, handle):
        self._serve()

    def map(self, pool, func, iterables, **kw):
        self._serve()
        return None

    def imap(self, pool, func, iterables, **kw):
        self._serve()
        return iter(())


def _thread_limits():
    """Cap BLAS/OpenMP pools to 1 thread while serving, unless the user chose a setting."""
    import contextlib

    if not worker_thread_env(os.environ):
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


_SERIAL = SerialExecutor()


def executor():
    """The executor for a map called at this point."""
    if _task.in_task() or knob("MPIMAP_SERIAL"):
        return _SERIAL
    if _state.executor is None:
        _decide()
    return _state.executor


def _decide():
    """First map of a plain script: serial, or collective over the launcher's world."""
    if launched_world_size(os.environ) is None and "mpi4py.MPI" not in sys.modules:
        _state.mode = "serial"
        _state.executor = _SERIAL
        return
    from . import _mpi

    if _mpi.world_size() == 1:
        _state.mode = "serial"
        _state.executor = _SERIAL
        return
    install_excepthook(force=True)
    session = _mpi.Session()
    _state.session = session
    _state.mode = "collective"
    if session.rank == 0:
        from ._driver import Engine

        _state.hub = _mpi.MPIHub(session)
        _state.engine = Engine(_state.hub, collective=True)
        _state.executor = EngineExecutor(_state.engine, collective=True)
    else:
        from ._worker import Worker

        _state.worker = Worker(_mpi.MPIEndpoint(session))
        _state.executor = CollectiveWorkerExecutor(_state.worker)


def use_engine(engine, collective=False):
    """Route maps of this process to ``engine`` (tests; returns the previous executor)."""
    previous = _state.executor
    _state.executor = EngineExecutor(engine, collective)
    return previous


def restore(previous):
    _state.executor = previous


# ----------------------------------------------------------------------------------------------
# Ending a job

def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _leaving():
    """This rank exits for good: make the exit clean for the MPI library.

    * MPICH's failure notice (SIGUSR1 under ``-disable-auto-cleanup``) can arrive again while
      ranks exit and would kill one that already restored Python's default action: ignore it.
    * A rank that leaves without MPI_Finalize (after a lost rank, or an abort) leaves MPICH's
      node-shared segments in /dev/shm, and a later job that happens to get the same name fails in
      MPI_Init. Every process of the node maps them, so the names can go now (the memory stays
      until the last mapping is gone); MPI_Init is long over, nothing attaches to them any more.
    """
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except (ValueError, OSError):
        pass
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if "/dev/shm/mpich" in line}
    except OSError:
        return
    for path in paths:
        try:
            os.unlink(path.removesuffix(" (deleted)"))
        except OSError:
            pass


def _exit_now(code):
    _flush()
    _leaving()
    os._exit(code)


def _die(message, code=1):
    print(f"mpimap: {message}", file=sys.stderr)
    _exit_now(code)


def _abort(code):
    """End every rank now: MPI_Abort if MPI is up (initialising it first if need be)."""
    _flush()
    # hydra stops forwarding a rank's output the moment it aborts: give it the last lines.
    time.sleep(0.3)
    try:
        from mpi4py import MPI

        if not MPI.Is_initialized():
            MPI.Init()
        if not MPI.Is_finalized():
            _leaving()
            MPI.COMM_WORLD.Abort(code or 1)
    except Exception:
        pass
    os._exit(code or 1)


_hook_installed = False


def install_excepthook(force: bool = False) -> None:
    """Under a launcher: an uncaught exception on any rank prints its traceback and aborts all."""
    global _hook_installed
    if _hook_installed:
        return
    size = launched_world_size(os.environ)
    if not force and (size is None or size == 1):
        return
    previous = sys.excepthook

    def hook(etype, value, tb):
        try:
            previous(etype, value, tb)
            rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
            print(f"mpimap: uncaught {etype.__name__} on rank {rank}; aborting every rank so "
                  f"none waits for it", file=sys.stderr)
        finally:
            _abort(1)

    sys.excepthook = hook
    _hook_installed = True


# ----------------------------------------------------------------------------------------------
# python -m mpimap

_USAGE = """usage: python -m mpimap [--guard] script.py [args...]

Run script.py as __main__ on rank 0; every other rank serves its pmap/imap/Pool calls.
Start it with a launcher, e.g.  mpiexec -n 8 python -m mpimap script.py  or  mpimap run -n 8 script.py
"""


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    guard = False
    while argv and argv[0].startswith("-"):
        opt = argv.pop(0)
        if opt in ("-h", "--help"):
            print(_USAGE)
            sys.exit(0)
        elif opt == "--version":
            from . import __version__

            print(f"mpimap {__version__}")
            sys.exit(0)
        elif opt == "--guard":
            guard = True
        else:
            sys.exit(f"mpimap: unknown option {opt}\n{_USAGE}")
    if not argv:
        sys.exit(_USAGE)
    script, args = argv[0], argv[1:]
    if not os.path.isfile(script):
        sys.exit(f"mpimap: cannot find the script {script!r} (cwd: {os.getcwd()})")
    if guard:
        _guard()
    _check_launcher_before_init()
    from . import _checkpoint

    _checkpoint.install_early()  # before MPI_Init: MPICH's SIGUSR1 handler then chains to ours
    from . import _startwatch

    watch = _startwatch.arm(knob("MPIMAP_START_TIMEOUT"), announced_rank(os.environ))
    from . import _mpi  # MPI_Init (mpi4py.MPI)
    rank = _mpi.world_rank()
    _check_launch(_mpi)
    if rank != 0:
        os.environ.update(worker_thread_env(os.environ))
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        session = _mpi.Session()
    except Exception:
        traceback.print_exc()
        _abort(1)
    _startwatch.disarm(watch)
    _state.session = session
    if session.size == 1:
        _state.mode, _state.executor = "serial", _SERIAL
        code = _run_script(script)
        sys.exit(code)
    if rank == 0:
        _driver_main(session, script)
    else:
        _worker_main(session)


# -- launcher / MPI library mismatch (see _env.launch_mismatch) ---------------------------------

def _launch_check_failed(problem: str) -> None:
    if announced_rank(os.environ) in (0, None):  # one message, not one per process
        print(f"mpimap: {problem}\n(MPIMAP_NO_LAUNCH_CHECK=1 skips this check.)",
              file=sys.stderr)
    else:
        import time

        time.sleep(1.0)  # a launcher that kills the job at the first exit must not cut rank 0 short
    _exit_now(2)


def _check_launcher_before_init() -> None:
    """A launcher the loaded MPI library cannot join makes MPI_Init abort with a terse message of
    its own: explain it first. mpi4py's ABI loader says which library it will load."""
    if knob("MPIMAP_NO_LAUNCH_CHECK"):
        return
    try:
        from mpi4py import _mpiabi  # present in mpi4py's multi-MPI wheels (4.1+)

        family = _mpiabi._get_mpiabi()
    except Exception:
        return
    problem = launcher_library_mismatch(os.environ, family)
    if problem is not None:
        _launch_check_failed(problem)


def _check_launch(mpi) -> None:
    """Fail fast, before the script runs, when the launcher and mpi4py's MPI library disagree.

    An mpiexec from another MPI, or ``srun --mpi=none``, starts N processes that each see a
    world of one (see _env.launch_mismatch). Each would run the whole script alone and compute
    everything N times; say so, with the fix, and stop every one of them.
    """
    if knob("MPIMAP_NO_LAUNCH_CHECK"):
        return
    problem = launch_mismatch(os.environ, mpi.world_size(), mpi.library())
    if problem is not None:
        _launch_check_failed(problem)


def _run_script(script) -> int:
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _driver_main(session, script):
    from . import _mpi
    from ._driver import Engine

    _state.mode = "driver"
    _state.hub = hub = _mpi.MPIHub(session)
    _state.engine = engine = Engine(hub)
    _state.executor = EngineExecutor(engine)
    code = _run_script(script)
    try:
        busy = engine.shutdown(knob("MPIMAP_SHUTDOWN_TIMEOUT"))
    except BaseException:
        traceback.print_exc()
        busy = sorted(w.rank for w in engine.live)
    if busy:
        print(f"mpimap: worker rank(s) {busy} did not stop within MPIMAP_SHUTDOWN_TIMEOUT="
              f"{knob('MPIMAP_SHUTDOWN_TIMEOUT')} s (still running a task?); aborting the job",
              file=sys.stderr)
        _abort(code or 1)
    hub.close()
    lost = any(not w.alive for w in engine.workers.values())
    session.finalize(clean=not lost)
    if lost:
        # MPI_Finalize can wait forever for a rank that died: leave without it.
        _exit_now(code)
    _flush()
    _leaving()
    sys.exit(code)


def _worker_main(session):
    from . import _mpi
    from ._worker import Worker

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides how a Ctrl-C ends the run
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    _serial._REGISTER_IN_MAIN = True
    _state.mode = "worker"
    worker = Worker(_mpi.MPIEndpoint(session))
    try:
        worker.serve()
    except _mpi.RankZeroGone:
        _die(f"rank 0 has exited; worker rank {session.rank} stops")
    except BaseException:
        traceback.print_exc()
        print(f"mpimap: internal error on worker rank {session.rank}; aborting", file=sys.stderr)
        _abort(1)
    if worker.abandon:
        _exit_now(0)
    session.finalize(clean=True)
    _flush()
    _leaving()
    sys.exit(0)


def _guard():
    """Run the rank as a child process and turn its death by a signal into an exit code.

    With ``mpiexec -disable-auto-cleanup`` hydra keeps the other ranks alive when one *exits*
    non-zero, but still kills them all when one is killed by a signal (SIGKILL, a segfault).
    The guard exits with 128+signal instead, so rank 0 survives to report the lost rank.
    Signals sent to the guard (SIGTERM, SIGINT, SIGUSR1...) are passed to the child.
    """
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass
        if os.getppid() != parent:
            os._exit(1)
        return

    def forward(signum, _frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP,
                signal.SIGQUIT, signal.SIGCONT):
        signal.signal(sig, forward)
    while True:
        try:
            _pid, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(1)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        rank = os.environ.get("PMI_RANK", "?")
        print(f"mpimap: rank {rank} (pid {child}) was killed by signal "
              f"{signal.Signals(sig).name}", file=sys.stderr)
        _exit_now(128 + sig)
    _exit_now(os.WEXITSTATUS(status))


def mode() -> str | None:
    return _state.mode


def is_root() -> bool:
    """True on the rank that drives maps (rank 0), and in serial mode."""
    if _state.mode is None:
        size = launched_world_size(os.environ)
        if size is None:
            return True
        rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or \
            os.environ.get("PMIX_RANK") or os.environ.get("SLURM_PROCID") or "0"
        return rank == "0"
    return _state.mode in ("serial", "driver") or (
        _state.mode == "collective" and _state.session is not None and _state.session.rank == 0)

