"""``mpimap run``: which launcher starts the ranks, its command line, and the one place that runs
external commands.

The decision is a pure function of (options, environment, MPI library); only three things touch
the outside world, each in its own small function:

    detect_library(python)  asks that Python which MPI library mpi4py loads   (via _call)
    identify(program)       runs ``PROGRAM --version``                          (via _call)
    run(options)            execs the launcher (or, for Open MPI, waits for it)

    options + environ --choose_launcher()--> Launcher (from launchers/*.ini)
                      --find_program()-----> /path/to/mpiexec | srun
                      --build_argv()-------> [argv]  --> --dry-run prints it, else exec

Inside a Slurm allocation (SLURM_JOB_ID set) the launcher is ``srun --mpi=<pmi>``, with the PMI
plugin that the loaded MPI library speaks; outside, the ``mpiexec`` of that same MPI library,
with the option that keeps the other ranks alive when one dies (so rank 0 can raise
WorkerLostError). Launchers are described by data files (``launchers/*.ini``, shipped in the
wheel as ``mpimap/launchers``); a site can read them to see exactly what mpimap runs.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

from ._errors import CommandError, LaunchError

__all__ = [
    "CommandError", "LaunchError", "Launcher", "Library", "RunOptions", "build_argv",
    "choose_launcher", "data_dir", "detect_library", "family_of", "find_mpiexec", "find_program",
    "identify", "mpiexec_name",
    "load_launchers", "run",
]


def _call(argv: Sequence[str], *, input: str | None = None, timeout: float | None = 60,
          env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one external command to completion and capture its output (text).

    Every external command mpimap runs for ``run`` and ``sbatch`` goes through here, so a failure
    always reports the command, its exit code, its stdout and its stderr.
    """
    argv = [os.fspath(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, env=None if env is None else dict(env))
    except FileNotFoundError:
        raise CommandError(argv, None, why=f"cannot run {argv[0]!r}: no such program "
                                           f"(is it installed and on PATH?)") from None
    except PermissionError as exc:
        raise CommandError(argv, None, why=f"cannot run {argv[0]!r}: {exc}") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, _text(exc.stdout), _text(exc.stderr),
                           why=f"command did not finish within {timeout} s") from None
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


# ----------------------------------------------------------------------------------------------
# Data files shipped with the package

def data_dir(name: str):
    """The folder ``name`` ('launchers', 'slurm_templates') as an importlib.resources Traversable.

    In a wheel both ship inside the package (mpimap/launchers, mpimap/slurm_templates); in a
    source checkout (also an editable install) they are top-level folders beside ``mpimap/``.
    """
    from importlib import resources

    packaged = resources.files("mpimap") / name
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / name
    if source.is_dir():
        return source
    raise LaunchError(f"mpimap's {name}/ folder is missing from the installation "
                      f"(looked in {packaged} and {source}); reinstall mpimap")


@dataclasses.dataclass(frozen=True)
class Launcher:
    """One ``launchers/*.ini`` file."""

    name: str
    title: str
    families: tuple[str, ...]
    programs: tuple[str, ...]
    identify: str
    command: str
    status: str
    forwarded: tuple[str, ...]
    warning_route: str          # 'batch' (#SBATCH --signal=B:...) or 'step' (--signal=...)
    warning: str                # the default warning signal
    pmi: Mapping[str, str]
    rank_death: str
    source: str

    @property
    def is_srun(self) -> bool:
        return self.name == "srun"

    @property
    def sbatch_prefix(self) -> str:
        """What goes before the signal in ``#SBATCH --signal=``."""
        return "B:" if self.warning_route == "batch" else ""


def parse_launcher(text: str, source: str = "<string>") -> Launcher:
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_string(text, source=source)
    try:
        main = cp["launcher"]
        sig = cp["signals"]
        launcher = Launcher(
            name=main["name"].strip(),
            title=main.get("title", main["name"]).strip(),
            families=tuple(main["families"].split()),
            programs=tuple(main["programs"].split()),
            identify=main["identify"].strip(),
            command=" ".join(main["command"].split()),
            status=main.get("status", "launcher").strip(),
            forwarded=tuple(s.upper() for s in sig["forwarded"].split()),
            warning_route=sig["warning_route"].strip(),
            warning=sig["warning"].strip().upper(),
            pmi=dict(cp["pmi"]) if cp.has_section("pmi") else {},
            rank_death=" ".join(cp.get("notes", "rank_death", fallback="").split()),
            source=source,
        )
    except KeyError as exc:
        raise LaunchError(f"launcher file {source} lacks {exc}") from None
    if launcher.status not in ("launcher", "rank0-file"):
        raise LaunchError(f"launcher file {source}: status must be 'launcher' or 'rank0-file'")
    if launcher.warning_route not in ("batch", "step"):
        raise LaunchError(f"launcher file {source}: warning_route must be 'batch' or 'step'")
    if launcher.warning_route == "batch" and launcher.warning not in launcher.forwarded:
        raise LaunchError(f"launcher file {source}: the warning signal must be forwarded")
    return launcher


def load_launchers() -> dict[str, Launcher]:
    """Every ``launchers/*.ini``, by launcher name."""
    out = {}
    folder = data_dir("launchers")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".ini"):
            launcher = parse_launcher(entry.read_text(encoding="utf-8"), f"launchers/{entry.name}")
            out[launcher.name] = launcher
    return out


# ----------------------------------------------------------------------------------------------
# Which MPI library mpi4py loads

@dataclasses.dataclass(frozen=True)
class Library:
    family: str          # 'mpich' (MPICH, Intel MPI, MVAPICH, Cray MPICH), 'openmpi', 'unknown'
    version: str         # first line of MPI_Get_library_version()
    path: str = ""       # the libmpi file that was loaded, when the platform says

    @property
    def prefix(self) -> str | None:
        """The installation prefix of the library: the folder above the lib/ that holds it."""
        if not self.path:
            return None
        d = os.path.dirname(self.path)
        while d and d != os.path.dirname(d):
            if os.path.basename(d).startswith("lib"):
                return os.path.dirname(d)
            d = os.path.dirname(d)
        return None


def family_of(version_text: str) -> str:
    """Launcher family from MPI_Get_library_version(): 'mpich', 'openmpi' or 'unknown'."""
    text = version_text.lower()
    if "open mpi" in text:
        return "openmpi"
    if any(k in text for k in ("mpich", "intel(r) mpi", "mvapich")):
        return "mpich"
    return "unknown"


_PROBE = r"""
import json, mpi4py
mpi4py.rc.initialize = False
mpi4py.rc.finalize = False
from mpi4py import MPI

path = ""
try:
    with open("/proc/self/maps") as maps:
        for line in maps:
            name = line.split()[-1] if len(line.split()) >= 6 else ""
            base = name.rsplit("/", 1)[-1]
            if base.startswith("libmpi.so") or base.startswith("libmpi_abi.so"):
                path = name
                break
except OSError:
    pass
print(json.dumps({"version": MPI.Get_library_version(), "path": path,
                  "mpi4py": mpi4py.__version__}))
"""


def detect_library(python: str = sys.executable,
                   environ: Mapping[str, str] | None = None) -> Library:
    """Ask ``python`` which MPI library its mpi4py loads (without initialising MPI)."""
    env = dict(os.environ if environ is None else environ)
    try:
        proc = _call([python, "-c", _PROBE], env=env, timeout=120)
    except CommandError as exc:
        raise LaunchError(
            f"cannot load mpi4py's MPI library with {python}, so mpimap cannot tell which "
            f"launcher to use. Install an MPI (`pip install mpich`, or load your cluster's MPI "
            f"module and rebuild mpi4py against it), or check `mpimap version -v`.\n{exc}"
        ) from None
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise CommandError([python, "-c", "<probe>"], proc.returncode, proc.stdout, proc.stderr,
                           why="could not read the MPI library probe's answer") from None
    lines = info["version"].strip().splitlines()
    version = " ".join(lines[0].split()) if lines else ""
    return Library(family_of(info["version"]), version, info.get("path") or "")


# ----------------------------------------------------------------------------------------------
# Choosing the launcher (pure)

@dataclasses.dataclass
class RunOptions:
    script: str
    args: list = dataclasses.field(default_factory=list)
    nprocs: int | None = None
    launcher: str = "auto"            # auto | srun | mpiexec | hydra | openmpi
    mpiexec: str | None = None        # an explicit launcher program
    python: str = sys.executable
    launcher_args: list = dataclasses.field(default_factory=list)
    dry_run: bool = False


LAUNCHER_CHOICES = ("auto", "srun", "mpiexec", "hydra", "openmpi")


def in_slurm_allocation(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID"))


def choose_launcher(requested: str, environ: Mapping[str, str], library: Library,
                    launchers: Mapping[str, Launcher]) -> Launcher:
    """The launcher for this run. ``requested``: auto | srun | mpiexec | hydra | openmpi."""
    requested = (requested or "auto").strip().lower()
    if requested not in LAUNCHER_CHOICES:
        raise LaunchError(f"unknown launcher {requested!r}; choose one of "
                          f"{', '.join(LAUNCHER_CHOICES)}")
    if requested == "auto":
        requested = "srun" if in_slurm_allocation(environ) else "mpiexec"
    if requested == "srun":
        srun = launchers["srun"]
        if library.family not in srun.pmi:
            raise LaunchError(
                f"mpimap does not know which `srun --mpi=` plugin the MPI library "
                f"{library.version!r} needs. Pass --launcher mpiexec to use its own mpiexec "
                f"inside the allocation, or run `srun --mpi=<plugin> python -m mpimap SCRIPT` "
                f"yourself (`srun --mpi=list` shows the plugins).")
        return srun
    if requested == "mpiexec":
        for launcher in launchers.values():
            if not launcher.is_srun and library.family in launcher.families:
                return launcher
        raise LaunchError(
            f"mpimap has no launcher file for the MPI library {library.version!r} "
            f"(family {library.family!r}). Pass --launcher hydra (MPICH-like) or --launcher "
            f"openmpi if you know which it is, or start it yourself: "
            f"`mpiexec -n N python -m mpimap SCRIPT`.")
    launcher = launchers[requested]
    if library.family != "unknown" and library.family not in launcher.families:
        raise LaunchError(_mismatch_text(launcher, library, None))
    return launcher


def _mismatch_text(launcher: Launcher, library: Library, program: str | None) -> str:
    what = f"{launcher.title}" + (f" ({program})" if program else "")
    return (f"mpi4py uses the MPI library {library.version!r}"
            f"{f' from {library.path}' if library.path else ''}, but {what} starts "
            f"{'/'.join(launcher.families)} programs: every rank would be a separate world of "
            f"one process running the whole script. Use the launcher that came with that MPI "
            f"library (drop --launcher/--mpiexec and let mpimap pick), or make mpi4py load the "
            f"other library (e.g. MPI4PY_LIBMPI=/path/to/libmpi.so).")


def mpiexec_name(library: Library, launchers: Mapping[str, Launcher] | None = None) -> str:
    """The name of the mpiexec launcher for ``library`` ('hydra', 'openmpi')."""
    launchers = load_launchers() if launchers is None else launchers
    return choose_launcher("mpiexec", {}, library, launchers).name


def srun_pmi(launcher: Launcher, library: Library) -> str:
    return launcher.pmi[library.family]


def build_argv(launcher: Launcher, program: str, opts: RunOptions, environ: Mapping[str, str],
               library: Library, status_file: str | None = None) -> list[str]:
    """The launcher's command line, from its ``command`` template (pure)."""
    if opts.nprocs is not None and opts.nprocs < 1:
        raise LaunchError("-n must be at least 1")
    if opts.nprocs is None and not in_slurm_allocation(environ):
        raise LaunchError("give the number of ranks with -n N (outside a Slurm allocation "
                          "mpimap cannot tell how many you want)")
    words = {
        "program": [program],
        "python": [opts.python],
        "script": [opts.script],
        "args": [str(a) for a in opts.args],
        "launcher_args": [str(a) for a in opts.launcher_args],
        "np": [] if opts.nprocs is None else ["-n", str(opts.nprocs)],
        "cpus_per_task": [],
        "status_file": [status_file or "STATUS_FILE"],
    }
    scalars = {}
    if launcher.is_srun:
        scalars["pmi"] = srun_pmi(launcher, library)
        cpt = environ.get("SLURM_CPUS_PER_TASK", "")
        user_set = any(a.startswith(("--cpus-per-task", "-c")) for a in opts.launcher_args)
        if cpt.isdigit() and not user_set:
            words["cpus_per_task"] = [f"--cpus-per-task={cpt}"]
    argv: list[str] = []
    for token in shlex.split(launcher.command):
        whole = re.fullmatch(r"\{(\w+)\}", token)
        if whole and whole.group(1) in words:
            argv += words[whole.group(1)]
            continue
        try:
            argv.append(token.format(**scalars))
        except (KeyError, IndexError) as exc:
            raise LaunchError(f"{launcher.source}: unknown placeholder {exc} in the command "
                              f"{launcher.command!r}") from None
    return argv


# ----------------------------------------------------------------------------------------------
# Finding and identifying the launcher program (runs commands)

def identify(program: str) -> str:
    """The first lines of ``PROGRAM --version`` (empty if it does not answer)."""
    try:
        proc = _call([program, "--version"], timeout=30, check=False)
    except CommandError:
        return ""
    return (proc.stdout + proc.stderr).strip()


def find_mpiexec(python: str = sys.executable) -> str | None:
    """The mpiexec beside ``python`` (the `mpich` wheel installs it there), else on PATH.

    A quick look-up for tests and tools; ``mpimap run`` itself uses find_program(), which also
    checks that the mpiexec belongs to mpi4py's MPI library.
    """
    here = os.path.join(os.path.dirname(python), "mpiexec")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


def _candidates(launcher: Launcher, python: str, library: Library,
                environ: Mapping[str, str]) -> list[str]:
    """Where to look, in order: beside the Python (the `mpich` wheel puts mpiexec in the venv's
    bin/), in the loaded MPI library's prefix, then on PATH."""
    dirs = [os.path.dirname(python)]
    if library.prefix:
        dirs.append(os.path.join(library.prefix, "bin"))
    path_dirs = [d for d in environ.get("PATH", os.defpath).split(os.pathsep) if d]
    out: list[str] = []
    for group in (dirs, path_dirs):   # every PATH entry: the first mpiexec may be the wrong one
        for name in launcher.programs:
            for d in group:
                path = os.path.join(d, name)
                if os.path.isfile(path) and os.access(path, os.X_OK) and path not in out:
                    out.append(path)
    return out


def find_program(launcher: Launcher, python: str, library: Library,
                 environ: Mapping[str, str], explicit: str | None = None) -> str:
    """The launcher program whose ``--version`` says it is ``launcher``; explains a mismatch."""
    pattern = re.compile(launcher.identify, re.IGNORECASE)
    if explicit:
        path = explicit if os.sep in explicit else shutil.which(
            explicit, path=environ.get("PATH", os.defpath))
        if not path or not os.access(path, os.X_OK):
            raise LaunchError(f"--mpiexec {explicit!r}: no such program")
        text = identify(path)
        if not pattern.search(text):
            raise LaunchError(_wrong_program_text(launcher, library, [(path, text)]))
        return path
    if launcher.is_srun:
        path = shutil.which("srun", path=environ.get("PATH", os.defpath))
        if not path:
            raise LaunchError(
                f"inside a Slurm allocation (SLURM_JOB_ID={environ.get('SLURM_JOB_ID')}) but "
                f"there is no srun on PATH. Load Slurm's module, or pass --launcher mpiexec.")
        return path
    seen = []
    for path in _candidates(launcher, python, library, environ):
        text = identify(path)
        if pattern.search(text):
            return path
        seen.append((path, text))
    if not seen:
        raise LaunchError(
            f"no {launcher.title} found (looked for {', '.join(launcher.programs)} beside "
            f"{python}, in the MPI library's prefix and on PATH). "
            + ("Install the `mpich` wheel (`pip install mpich`) or load your MPICH module."
               if launcher.name == "hydra" else
               "Load the Open MPI module that mpi4py was built against, or pass --mpiexec PATH."))
    raise LaunchError(_wrong_program_text(launcher, library, seen))


def _wrong_program_text(launcher: Launcher, library: Library, seen) -> str:
    lines = [f"mpi4py uses the MPI library {library.version!r}"
             f"{f' ({library.path})' if library.path else ''}, which needs {launcher.title}, "
             f"but:"]
    for path, text in seen:
        first = text.splitlines()[0] if text else "no answer to --version"
        lines.append(f"  {path} is another launcher ({first.strip()})")
    lines.append("A launcher from another MPI would start every rank as a separate world of one "
                 "process. Fix: put the matching launcher first (activate the virtualenv that "
                 "has the `mpich` wheel, or load the MPI module mpi4py was built with), pass "
                 "--mpiexec /path/to/its/mpiexec, or point mpi4py at the other library with "
                 "MPI4PY_LIBMPI.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# mpimap run

@dataclasses.dataclass
class Plan:
    launcher: Launcher
    program: str
    library: Library
    opts: RunOptions
    environ: Mapping[str, str]

    def argv(self, status_file: str | None = None) -> list[str]:
        return build_argv(self.launcher, self.program, self.opts, self.environ, self.library,
                          status_file)


def plan(opts: RunOptions, environ: Mapping[str, str] | None = None,
         library: Library | None = None) -> Plan:
    """Launcher and program for ``opts`` (detects the library and finds the program)."""
    env = os.environ if environ is None else environ
    if not os.path.isfile(opts.script):
        raise LaunchError(f"cannot find the script {opts.script!r} (cwd: {os.getcwd()})")
    from ._env import knob

    requested = opts.launcher
    if requested == "auto":
        requested = knob("MPIMAP_LAUNCHER", env)
    explicit = opts.mpiexec or knob("MPIMAP_MPIEXEC", env) or None
    if library is None:
        library = detect_library(opts.python, env)
    launchers = load_launchers()
    launcher = choose_launcher(requested, env, library, launchers)
    if launcher.is_srun and explicit:
        raise LaunchError("--mpiexec names an mpiexec, but the launcher is srun; pass "
                          "--launcher mpiexec to use it inside the allocation")
    program = find_program(launcher, opts.python, library, env, explicit)
    result = Plan(launcher, program, library, opts, env)
    result.argv()  # check the options now, before anything runs
    return result


def run(opts: RunOptions) -> int:
    """``mpimap run``: print the command (--dry-run) or replace this process with it."""
    p = plan(opts)
    if opts.dry_run:
        print(shlex.join(p.argv()))
        return 0
    if p.launcher.status == "rank0-file":
        return _run_with_status_file(p)
    argv = p.argv()
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals sent to this process (scancel, the --signal warning) reach
    # the launcher itself, which forwards them to the ranks.
    os.execv(argv[0], argv)
    return 127  # not reached


def _run_with_status_file(p: Plan) -> int:
    """Open MPI: mpirun --enable-recovery exits 0 whatever the ranks do, so rank 0's wrapper
    (mpimap._rankexit) writes its exit status to a file, and we exit with that."""
    # In the working directory, which a multi-host run usually shares with rank 0's host.
    try:
        folder = tempfile.mkdtemp(prefix=".mpimap-run-", dir=os.getcwd())
    except OSError:
        folder = tempfile.mkdtemp(prefix="mpimap-run-")
    status_file = os.path.join(folder, "rank0.status")
    try:
        argv = p.argv(status_file)
        sys.stdout.flush()
        sys.stderr.flush()
        proc = subprocess.Popen(argv)
        from ._rankexit import forward_signals

        previous = forward_signals(proc)
        try:
            while True:
                try:
                    code = proc.wait()
                    break
                except InterruptedError:
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return _final_status(code, _read_status(status_file))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read_status(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _final_status(launcher_code: int, rank0: int | None) -> int:
    """Rank 0's exit status when it left one, else the launcher's (signals as 128+N)."""
    if launcher_code < 0:
        launcher_code = 128 - launcher_code
    if rank0 is not None:
        return rank0 if rank0 != 0 else launcher_code
    if launcher_code == 0:
        print("mpimap run: rank 0 left no exit status (it was never started, or was killed "
              "with its wrapper); treating the run as failed", file=sys.stderr)
        return 1
    return launcher_code
