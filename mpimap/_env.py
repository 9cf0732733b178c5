"""Every MPIMAP_* knob, with its default, read in one place; launcher detection as pure functions.

A bad value raises ValueError naming the knob, so the message says what to change. Knobs are read
when they are used (not at import), so a test or a script can set them with ``os.environ``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

__all__ = ["KNOBS", "knob", "launch_mismatch", "launched_world_size", "launcher_library_mismatch",
           "worker_thread_env"]


@dataclass(frozen=True)
class Knob:
    name: str
    default: object
    parse: Callable[[str], object]
    doc: str


def _bool(text):
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    return parse


def _bytes(text):
    """'64K', '1M', '1G' or a plain number of bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in scale:
        value = int(float(text[:-1]) * scale[text[-1]])
    else:
        value = int(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _path_template(text):
    """A directory; may hold {node}. Relative paths would differ between ranks: refused."""
    text = os.path.expanduser(text.strip())
    if not text:
        return ""
    if "{" in text.replace("{node}", ""):
        raise ValueError("the only placeholder is {node}")
    if not os.path.isabs(text):
        raise ValueError("must be an absolute path")
    return text


def _choice(*choices):
    def parse(text):
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


KNOBS = {
    k.name: k
    for k in [
        Knob("MPIMAP_CHUNK_SECONDS", 0.01, _positive(float),
             "least target seconds of work per automatic chunk (overhead vs. tail length)"),
        Knob("MPIMAP_PREFETCH", 2, _positive(int),
             "chunks queued per worker while chunks are short, so no worker waits for rank 0"),
        Knob("MPIMAP_READ_AHEAD", 0, lambda t: max(0, int(t)),
             "imap: most items read from the input ahead of the consumer (0: automatic)"),
        Knob("MPIMAP_SHUTDOWN_TIMEOUT", 5.0, _positive(float),
             "seconds rank 0 waits for workers at exit before it aborts the job"),
        Knob("MPIMAP_LIFELINE", True, _bool,
             "TCP lifeline from every worker to rank 0: instant wake-ups and lost-rank detection"),
        Knob("MPIMAP_CONNECT_TIMEOUT", 20.0, _positive(float),
             "seconds a worker tries to open its lifeline to rank 0"),
        Knob("MPIMAP_START_TIMEOUT", 300.0, lambda t: max(0.0, float(t)),
             "python -m mpimap: seconds a rank may take to join the job (MPI_Init, communicators, "
             "lifelines) before it gives up, so a rank that died at start is no hang (0: wait)"),
        Knob("MPIMAP_SPIN", 0.0003, lambda t: max(0.0, float(t)),
             "seconds a rank polls MPI before it sleeps when a message is due soon (latency)"),
        Knob("MPIMAP_POLL_MAX", 0.002, _positive(float),
             "longest sleep between MPI polls when no lifeline is available (seconds)"),
        Knob("MPIMAP_MAX_MESSAGE", 1 << 30, _bytes,
             "largest single MPI message; bigger buffers are sent in pieces of this size"),
        Knob("MPIMAP_INLINE_MAX", 64 << 10, _bytes,
             "array buffers up to this size travel inside the message header"),
        Knob("MPIMAP_BCAST_MIN", 256 << 10, _bytes,
             "function/common payloads at least this big are broadcast to all workers at once"),
        Knob("MPIMAP_SHARE", "auto", _choice("auto", "memfd", "file", "copy", "off"),
             "how the ranks of a node share large broadcast arrays: auto (a memfd, else a "
             "file in /dev/shm, else a copy per rank), memfd, file, copy (one receiver per "
             "node, a private copy per rank) or off (every rank receives its own copy)"),
        Knob("MPIMAP_SHARE_MIN", 1 << 20, _bytes,
             "broadcast array buffers totalling at least this many bytes are held once per "
             "node (read-only shared memory); smaller ones are copied per rank"),
        Knob("MPIMAP_CODE_CACHE", 16, _positive(int),
             "functions kept loaded on workers between maps"),
        Knob("MPIMAP_SERIAL", False, _bool,
             "run every map in-process even under a launcher (debugging)"),
        Knob("MPIMAP_NO_THREAD_LIMITS", False, _bool,
             "do not cap BLAS/OpenMP threads to 1 on serving ranks"),
        Knob("MPIMAP_CHECKPOINT_FLUSH", 1.0, lambda t: max(0.0, float(t)),
             "checkpoints: seconds between writes (and fsyncs) of the journal; a kill -9 loses "
             "at most the results of this last interval (0: write each result as it arrives)"),
        Knob("MPIMAP_CHECKPOINT_GRACE", 5.0, lambda t: max(0.0, float(t)),
             "checkpoints: seconds rank 0 waits for running tasks after SIGTERM/SIGINT/SIGUSR1 "
             "before it saves and exits"),
        Knob("MPIMAP_LAUNCHER", "auto", _choice("auto", "srun", "mpiexec", "hydra", "openmpi"),
             "which launcher `mpimap run` uses (auto: srun inside a Slurm allocation, else the "
             "mpiexec of mpi4py's MPI library)"),
        Knob("MPIMAP_MPIEXEC", "", str.strip,
             "the mpiexec/mpirun program `mpimap run` uses (default: found beside Python, in "
             "the MPI library's prefix, or on PATH)"),
        Knob("MPIMAP_NO_LAUNCH_CHECK", False, _bool,
             "skip the check that the launcher and mpi4py's MPI library agree on the world size"),
        Knob("MPIMAP_CACHE_DIR", "", _path_template,
             "node-local directory that keeps files=/modules= bundles between jobs (default "
             "/tmp/mpimap-<uid>; {node} is replaced by the node name)"),
        Knob("MPIMAP_SCRATCH_DIR", "", _path_template,
             "node-local directory for the per-rank working and scratch directories (default "
             "$SLURM_TMPDIR when set, else the system temporary directory; {node} is replaced "
             "by the node name)"),
        Knob("MPIMAP_BUNDLE_PIECE", 64 << 20, _bytes,
             "bundles travel to the nodes in pieces of this size (a stager holds one in memory)"),
        Knob("MPIMAP_AUTO_MODULES", True, _bool,
             "ship the local modules a mapped function imports from your source tree"),
    ]
}


def knob(name: str, environ: Mapping[str, str] | None = None):
    """Value of knob ``name`` from ``environ`` (default: os.environ), parsed, or its default."""
    spec = KNOBS[name]
    env = os.environ if environ is None else environ
    raw = env.get(name)
    if raw is None or raw == "":
        return spec.default
    try:
        return spec.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"environment variable {name}={raw!r} is invalid ({exc}); it sets {spec.doc}; "
            f"unset it to use the default {spec.default!r}"
        ) from None


# Variables a launcher sets in every rank's environment, with the world size they announce.
_SIZE_VARS = (
    "PMI_SIZE",  # MPICH hydra, Slurm pmi2, Intel MPI
    "OMPI_COMM_WORLD_SIZE",  # Open MPI
    "PMIX_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_STEP_NUM_TASKS",  # srun step (not the batch script, whose step has 1 task)
)
_PRESENCE_VARS = ("PMI_FD", "PMI_PORT", "PMIX_RANK", "PMIX_NAMESPACE", "OMPI_COMM_WORLD_RANK")


def launched_world_size(environ: Mapping[str, str]) -> int | None:
    """World size a launcher announced in ``environ``; None when no launcher is visible.

    Returns 0 when a launcher is visible but did not say the size (ask MPI itself then).
    """
    for var in _SIZE_VARS:
        value = environ.get(var)
        if value and value.isdigit():
            if var == "SLURM_STEP_NUM_TASKS" and "SLURM_STEP_ID" in environ:
                # The batch step and interactive steps also carry it; only trust it with a PMI.
                if not any(v in environ for v in ("PMI_FD", "PMI_RANK", "PMIX_RANK")):
                    continue
            return int(value)
    if any(v in environ for v in _PRESENCE_VARS):
        return 0
    return None


# What a launcher announces, for the mismatch check: (variable, who sets it).
_ANNOUNCERS = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "A PMI launcher (MPICH's hydra mpiexec, or srun --mpi=pmi2)"),
    ("PMIX_SIZE", "A PMIx launcher"),
    ("SLURM_STEP_NUM_TASKS", "srun"),
)
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def announced_rank(environ: Mapping[str, str]) -> int | None:
    """This process's rank as the launcher announced it, if it did."""
    for var in _RANK_VARS:
        value = environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_library_mismatch(environ: Mapping[str, str], family: str) -> str | None:
    """Before MPI starts: is this process's launcher one that ``family``'s library cannot join?

    ``family`` is the library mpi4py is about to load ('mpich' or 'openmpi'; anything else:
    no opinion). Caught here because such a library aborts inside MPI_Init with its own terse
    message (MPICH under Open MPI's mpirun: "unsupported PMI version PMIx").
    """
    if family == "mpich" and environ.get("OMPI_COMM_WORLD_SIZE", "").isdigit():
        return ("Open MPI's mpirun started this process (OMPI_COMM_WORLD_SIZE is set), but "
                "mpi4py loads an MPICH-family MPI library, which cannot join an Open MPI job. "
                "Use MPICH's own mpiexec (`mpimap run` finds it; with the `mpich` wheel it is "
                "in the virtualenv's bin/), or make mpi4py load Open MPI "
                "(MPI4PY_LIBMPI=/path/to/libmpi.so.40, or rebuild mpi4py against it).")
    if family == "openmpi" and any(v in environ for v in ("PMI_FD", "PMI_PORT")) and not any(
            v in environ for v in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMIX_NAMESPACE")):
        how = ("srun --mpi=pmi2" if "SLURM_STEP_ID" in environ
               else "a PMI launcher such as MPICH's hydra mpiexec")
        return (f"{how} started this process, but mpi4py loads Open MPI, which needs PMIx. "
                f"Use `mpimap run` (it picks Open MPI's mpirun, or `srun --mpi=pmix` inside "
                f"Slurm), or make mpi4py load the MPICH library the launcher belongs to.")
    return None


def launch_mismatch(environ: Mapping[str, str], world_size: int, library: str = "") -> str | None:
    """Why the launcher and MPI disagree, or None when they agree (or nothing can be told).

    A launcher from another MPI than the one mpi4py loaded (or ``srun --mpi=none``) starts N
    processes that each see a world of one and would each run the whole script alone. The
    launcher still announces N in the environment; MPI's own world size tells the truth.
    """
    lib = f" ({library})" if library else ""
    announced = [(var, who, int(environ[var])) for var, who in _ANNOUNCERS[:3]
                 if environ.get(var, "").isdigit()]
    if not announced:
        # Only srun's own count is left. It is the step's task count: trust it only for a task
        # of an srun step (not the batch script) that no PMI-speaking launcher started.
        value = environ.get("SLURM_STEP_NUM_TASKS", "")
        if (world_size == 1 and value.isdigit() and int(value) > 1 and "SLURM_PROCID" in environ
                and not any(v in environ for v in ("PMI_FD", "PMI_PORT", "PMIX_NAMESPACE"))):
            return (f"srun started {value} processes (SLURM_STEP_NUM_TASKS={value}), but MPI "
                    f"gives this one a world of 1: each would run the whole script alone. srun "
                    f"started them without a PMI plugin that this MPI library{lib} speaks "
                    f"(srun --mpi=none, or a site default of none), so they cannot find each "
                    f"other. Use `mpimap run` inside the allocation, or `srun --mpi=pmi2` for "
                    f"MPICH / Intel MPI and `srun --mpi=pmix` for Open MPI (`srun --mpi=list` "
                    f"shows what the site has).")
        return None
    for var, who, value in announced:
        if value == world_size:
            continue
        if world_size != 1:
            return (f"the launcher announced {var}={value}, but MPI reports a world of "
                    f"{world_size} processes. Start the script with `mpimap run`, or with the "
                    f"launcher of the MPI library mpi4py uses{lib}.")
        if var == "OMPI_COMM_WORLD_SIZE":
            fix = (f"Open MPI's mpirun started them, but mpi4py loaded another MPI library{lib}. "
                   f"Use that library's own mpiexec (`mpimap run` finds it), or make mpi4py "
                   f"load Open MPI (MPI4PY_LIBMPI=/path/to/libmpi.so.40, or rebuild mpi4py "
                   f"against it).")
        else:
            fix = (f"{who} started them, but mpi4py's MPI library{lib} did not join its "
                   f"world: the launcher belongs to another MPI. Use `mpimap run`, which picks "
                   f"the launcher of the library mpi4py loads, or put that library's mpiexec "
                   f"first on PATH.")
        return (f"the launcher started {value} processes ({var}={value}), but MPI gives this "
                f"one a world of 1: each would run the whole script alone. {fix}")
    return None


_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


def worker_thread_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Thread-count variables to set on a serving rank: 1 for each one the user left unset.

    If the user set any of them, they chose their threading: nothing is changed.
    """
    if knob("MPIMAP_NO_THREAD_LIMITS", environ):
        return {}
    if any(environ.get(v) for v in _THREAD_VARS):
        return {}
    return {v: "1" for v in _THREAD_VARS}
