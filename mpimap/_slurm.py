"""``mpimap sbatch``: render a Slurm batch script from a Jinja2 template, submit it, wait for it.

    SbatchOptions --context()--> dict --template (slurm_templates/*.j2, StrictUndefined)--> text
        --dry-run: print it        else: _call(["sbatch", "--parsable"], input=text) -> job id
        --wait: poll `scontrol show job -o ID` until the job ends (wait_for_job); exit with its
        exit code

Rendering is a pure function of the options (checked against tests/golden/). Values go into
two different languages, each with its own quoting:

* ``#SBATCH`` lines are read by sbatch, not bash: a value is wrapped in double quotes with ``\\``
  and ``"`` escaped (measured with Slurm 22.05); a newline cannot be written at all. In the
  filename patterns (--output, --error) ``%`` starts a replacement (``%j``): a literal ``%`` that
  mpimap puts into one (the job name in the default output name) is written ``%%``; what the
  user passes as --output/--error is their pattern and is kept as it is.
* the shell part is bash: every value goes through shlex.quote.

The final command is ``exec``-ed: the batch shell becomes the launcher, so scancel's SIGTERM and
the ``--signal=B:SIG@T`` warning reach the launcher, which forwards them to every rank. (A bash
script that runs python as a plain child dies at once on scancel and leaves python running.)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import time
from typing import Mapping, Sequence

from ._launch import (CommandError, LaunchError, _call, data_dir, detect_library, load_launchers,
                      mpiexec_name)

__all__ = ["SbatchOptions", "context", "job_state", "render", "sbatch", "submit", "wait_for_job"]

DEFAULT_TEMPLATE = "mpimap.sbatch.j2"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
SBATCH_LAUNCHERS = ("srun", "mpiexec", "hydra", "openmpi")


@dataclasses.dataclass
class SbatchOptions:
    """Everything a template can use. None / empty: the line is left out (Slurm's default)."""

    script: str
    args: Sequence[str] = ()
    job_name: str | None = None          # default: the script's file name without .py
    nodes: int | str | None = None
    ntasks: int | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    time: str | None = None              # Slurm syntax: MM, HH:MM:SS, D-HH:MM...
    partition: str | None = None
    account: str | None = None
    mem: str | None = None               # per node, e.g. 4G
    output: str | None = None            # a Slurm filename pattern; default <job name>-%j.out
    error: str | None = None             # default: into the output file
    chdir: str | None = None
    modules: Sequence[str] = ()
    venv: str | None = None              # a virtualenv folder to activate
    conda_env: str | None = None         # a conda environment name or path to activate
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    setup: Sequence[str] = ()            # shell lines run before the launch, verbatim
    extra_sbatch: Sequence[str] = ()     # extra #SBATCH options, e.g. "--gres=gpu:1"
    signal: str | None = None            # the warning: [SIG@]SECONDS before the limit; None: none
    launcher: str = "srun"               # srun | mpiexec (| hydra | openmpi)
    launcher_args: Sequence[str] = ()
    python: str = sys.executable         # with venv/conda: "python" of that environment
    template: str = DEFAULT_TEMPLATE     # a name in slurm_templates/, or a path


# ----------------------------------------------------------------------------------------------
# Quoting

def sbatch_value(value) -> str:
    """A value on an ``#SBATCH`` line, quoted the way sbatch's own parser reads it."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise LaunchError(f"{text!r} contains a line break, which an #SBATCH line cannot hold; "
                          f"remove it")
    if text and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def slurm_literal(text: str) -> str:
    """``text`` as a literal inside a Slurm filename pattern (``%`` -> ``%%``)."""
    return str(text).replace("%", "%%")


def sbatch_line(text: str) -> str:
    """An extra ``#SBATCH`` option, as the user wrote it (they write sbatch's syntax)."""
    text = str(text).strip()
    if "\n" in text or "\r" in text:
        raise LaunchError(f"extra #SBATCH option {text!r} contains a line break; give one "
                          f"option per --extra-sbatch")
    if not text.startswith("-"):
        raise LaunchError(f"extra #SBATCH option {text!r} must be an sbatch option such as "
                          f"--gres=gpu:1")
    return text


def shquote(value) -> str:
    return shlex.quote(str(value))


# ----------------------------------------------------------------------------------------------
# Checking the options and building the template's context (pure)

_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "QUIT", "CONT", "URG", "ALRM")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_seconds(text: str) -> int | None:
    """Seconds in a Slurm --time value; None for UNLIMITED/INFINITE."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(text)
    if not m:
        raise LaunchError(f"--time {text!r} is not a Slurm time: use MINUTES, MM:SS, HH:MM:SS, "
                          f"D-HH, D-HH:MM or D-HH:MM:SS")
    days, a, b, c = m.groups()
    days = int(days or 0)
    if days and b is None:        # D-HH
        h, mi, s = int(a), 0, 0
    elif days and c is None:      # D-HH:MM
        h, mi, s = int(a), int(b), 0
    elif c is not None:           # [D-]HH:MM:SS
        h, mi, s = int(a), int(b), int(c)
    elif b is not None:           # MM:SS
        h, mi, s = 0, int(a), int(b)
    else:                         # MM
        h, mi, s = 0, int(a), 0
    return ((days * 24 + h) * 60 + mi) * 60 + s


def parse_signal(spec: str | None, default_signal: str) -> tuple[str, int] | None:
    """'USR1@120' -> ('USR1', 120); '120' or '@120' -> (default_signal, 120); 'USR1' -> 120 s;
    None / 'none' -> None (no warning)."""
    if spec is None or str(spec).strip().lower() in ("", "none", "off", "no"):
        return None
    text = str(spec).strip()
    if text.isdigit():
        text = "@" + text
    name, _, when = text.partition("@")
    name = name.upper().removeprefix("SIG") or default_signal
    if name.startswith("B:"):
        raise LaunchError(f"--signal {spec!r}: leave out 'B:'; mpimap adds it when the launcher "
                          f"needs it")
    if name not in _SIGNALS:
        raise LaunchError(f"--signal {spec!r}: unknown signal {name!r} (write SIG@SECONDS, "
                          f"e.g. USR1@120, or just SECONDS)")
    try:
        seconds = int(when) if when else 120
    except ValueError:
        raise LaunchError(f"--signal {spec!r}: the part after @ must be whole seconds") from None
    if not 0 < seconds <= 65535:
        raise LaunchError(f"--signal {spec!r}: seconds must be between 1 and 65535")
    return name, seconds


def _positive(name, value):
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"--{name} must be a whole number, not {value!r}") from None
    if number < 1:
        raise LaunchError(f"--{name} must be at least 1")
    return number


def context(opts: SbatchOptions, launchers=None) -> dict:
    """The template's variables. Every one is always present (None or empty when unset)."""
    from . import __version__

    launchers = load_launchers() if launchers is None else launchers
    if opts.launcher not in SBATCH_LAUNCHERS:
        raise LaunchError(f"--launcher {opts.launcher!r}: choose one of "
                          f"{', '.join(SBATCH_LAUNCHERS)}")
    if opts.venv and opts.conda_env:
        raise LaunchError("give --venv or --conda-env, not both")
    job_name = opts.job_name or os.path.splitext(os.path.basename(opts.script))[0] or "mpimap"
    limit = time_seconds(opts.time) if opts.time else None
    signal, prefix = None, ""
    if opts.signal is not None and str(opts.signal).strip().lower() not in ("", "none"):
        if opts.launcher == "mpiexec":
            raise LaunchError("with --signal, name the mpiexec: --launcher hydra (MPICH) or "
                              "--launcher openmpi; they forward different signals")
        spec = launchers[opts.launcher]
        signal = parse_signal(opts.signal, spec.warning)
        prefix = spec.sbatch_prefix
        if spec.warning_route == "batch" and signal[0] not in spec.forwarded:
            raise LaunchError(
                f"--signal {opts.signal}: {spec.title} does not pass SIG{signal[0]} on to every "
                f"rank (it forwards {', '.join(spec.forwarded)}); use --signal "
                f"{spec.warning}@{signal[1]}, or --launcher srun (any signal)")
        if limit is not None and signal[1] >= limit:
            raise LaunchError(f"--signal {opts.signal}: {signal[1]} s before a time limit of "
                              f"{limit} s is before the job starts; warn fewer seconds ahead")
    env = []
    for name, value in dict(opts.env).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"--env {name!r}: not a valid environment variable name")
        env.append((name, str(value)))
    for line in opts.setup:
        if "\n" in line:
            raise LaunchError("--setup takes one shell line per option; give it several times")
    python = "python" if (opts.venv or opts.conda_env) and opts.python == sys.executable \
        else opts.python
    return {
        "job_name": job_name,
        "nodes": opts.nodes,
        "ntasks": _positive("ntasks", opts.ntasks),
        "ntasks_per_node": _positive("ntasks-per-node", opts.ntasks_per_node),
        "cpus_per_task": _positive("cpus-per-task", opts.cpus_per_task),
        "time": opts.time,
        "partition": opts.partition,
        "account": opts.account,
        "mem": opts.mem,
        "output": opts.output or f"{slurm_literal(job_name)}-%j.out",
        "error": opts.error,
        "chdir": opts.chdir,
        "modules": list(opts.modules),
        "venv": opts.venv,
        "conda_env": opts.conda_env,
        "env": env,
        "setup": list(opts.setup),
        "extra_sbatch": list(opts.extra_sbatch),
        "signal": signal[0] if signal else None,
        "signal_seconds": signal[1] if signal else None,
        "signal_prefix": prefix,
        "launcher": opts.launcher,
        "launcher_args": [str(a) for a in opts.launcher_args],
        "python": python,
        "script": opts.script,
        "args": [str(a) for a in opts.args],
        "mpimap_version": __version__,
    }


# ----------------------------------------------------------------------------------------------
# Rendering

def _environment(extra_dir: str | None = None):
    import jinja2

    loaders = []
    if extra_dir is not None:
        loaders.append(jinja2.FileSystemLoader(extra_dir))
    loaders.append(jinja2.FunctionLoader(_builtin_template))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,   # a missing value is an error, not an empty line
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(sbatch_value=sbatch_value, sbatch_line=sbatch_line,
                       slurm_literal=slurm_literal, shquote=shquote)
    return env


def _builtin_template(name: str):
    folder = data_dir("slurm_templates")
    entry = folder / name
    if "/" in name or not entry.is_file():
        return None
    return entry.read_text(encoding="utf-8")


def builtin_templates() -> list[str]:
    return sorted(e.name for e in data_dir("slurm_templates").iterdir()
                  if e.name.endswith(".j2"))


def render(opts: SbatchOptions, launchers=None) -> str:
    """The batch script for ``opts`` (pure: same options, same text)."""
    import jinja2

    ctx = context(opts, launchers)
    name = opts.template or DEFAULT_TEMPLATE
    if os.sep in name or os.path.isfile(name):
        if not os.path.isfile(name):
            raise LaunchError(f"--template {name!r}: no such file")
        env = _environment(os.path.dirname(os.path.abspath(name)))
        name = os.path.basename(name)
    else:
        env = _environment()
        if _builtin_template(name) is None:
            raise LaunchError(f"--template {name!r}: neither a file nor one of mpimap's "
                              f"templates ({', '.join(builtin_templates())})")
    try:
        text = env.get_template(name).render(**ctx)
    except jinja2.UndefinedError as exc:
        raise LaunchError(f"template {opts.template!r} uses an undefined value ({exc}); the "
                          f"values a template can use are: {', '.join(sorted(ctx))}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise LaunchError(f"template {opts.template!r}, line {exc.lineno}: {exc.message}") \
            from None
    return text


# ----------------------------------------------------------------------------------------------
# Submitting and waiting (through _call)

def submit(text: str, sbatch: str = "sbatch") -> str:
    """Submit a batch script (on stdin); the job id."""
    proc = _call([sbatch, "--parsable"], input=text, timeout=120)
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0].strip() if proc.stdout.strip() \
        else ""
    if not job_id.isdigit():
        raise CommandError([sbatch, "--parsable"], proc.returncode, proc.stdout, proc.stderr,
                           why="sbatch did not print a job id")
    return job_id


def parse_show_job(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output -> {'JobState': 'RUNNING', 'ExitCode': '0:0', ...}."""
    fields = {}
    for m in re.finditer(r"(\w+(?:/\w+)?)=(\S*)", text):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def exit_status(fields: Mapping[str, str]) -> int:
    """A shell-style exit status for a finished job: its code, 128+signal, or 1 if it failed
    without one (cancelled before it ran, node failure...)."""
    code, _, sig = fields.get("ExitCode", "0:0").partition(":")
    code = int(code) if code.isdigit() else 0
    sig = int(sig) if sig.isdigit() else 0
    if code:
        return code
    if sig:
        return 128 + sig
    return 0 if fields.get("JobState") == "COMPLETED" else 1


def job_state(job_id: str, scontrol: str = "scontrol") -> dict[str, str]:
    proc = _call([scontrol, "show", "job", "-o", str(job_id)], timeout=60)
    return parse_show_job(proc.stdout)


def wait_for_job(job_id: str, timeout: float | None = None, scontrol: str = "scontrol",
         poll: float = 0.25, poll_max: float = 5.0) -> dict[str, str]:
    """Poll until the job reaches a final state; its ``scontrol show job`` fields.

    Polls ``scontrol show job -o`` itself (``sbatch --wait`` can add ~8 s); finished jobs stay
    visible for the cluster's MinJobAge (300 s by default).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = poll
    while True:
        try:
            fields = job_state(job_id, scontrol)
        except CommandError as exc:
            if "Invalid job id" in exc.stderr:
                raise LaunchError(f"job {job_id} is no longer known to Slurm (it ended more "
                                  f"than MinJobAge seconds ago?); its exit code is lost") \
                    from None
            raise
        state = fields.get("JobState", "")
        if state in TERMINAL_STATES:
            return fields
        if deadline is not None and time.monotonic() > deadline:
            raise LaunchError(f"job {job_id} still {state or 'unknown'} after {timeout} s")
        time.sleep(delay)
        delay = min(poll_max, delay * 1.5)


# ----------------------------------------------------------------------------------------------
# mpimap sbatch

def sbatch(opts: SbatchOptions, *, dry_run: bool = False, wait: bool = False,
           wait_timeout: float | None = None, out=None, err=None) -> int:
    """Render; print (dry run) or submit and print the job id; with ``wait``, wait and return
    the job's exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if not os.path.isfile(opts.script):
        raise LaunchError(f"cannot find the script {opts.script!r}")
    if opts.launcher == "mpiexec" and opts.signal:
        # hydra and Open MPI forward different signals: name the one the job will use
        opts = dataclasses.replace(opts, launcher=mpiexec_name(detect_library(opts.python)))
    text = render(opts)
    if dry_run:
        out.write(text)
        return 0
    job_id = submit(text)
    print(job_id, file=out, flush=True)
    if not wait:
        return 0
    fields = wait_for_job(job_id, timeout=wait_timeout)
    print(f"mpimap sbatch: job {job_id} ended {fields.get('JobState')} (ExitCode "
          f"{fields.get('ExitCode')}); output: {fields.get('StdOut', '?')}", file=err)
    return exit_status(fields)
