"""The ``mpimap`` command: argument parsing only; the work is done elsewhere.

One function per subcommand; each turns its arguments into a call to the module that does the
work (_launch for run, _slurm for sbatch, _bundle / _cache for bundle and cache,
_checkpoint for checkpoint info).
"""

from __future__ import annotations

import argparse
import os
import sys


def _version(args) -> int:
    from . import __version__

    print(f"mpimap {__version__}")
    if args.verbose:
        import dill

        print(f"python {sys.version.split()[0]} ({sys.executable})")
        print(f"dill {dill.__version__}")
        try:
            import mpi4py
            from mpi4py import MPI

            print(f"mpi4py {mpi4py.__version__}; MPI library: "
                  f"{MPI.Get_library_version().splitlines()[0].strip()}")
        except Exception as exc:  # an MPI problem is exactly what -v is for
            print(f"mpi4py: not usable ({type(exc).__name__}: {exc})")
    return 0


def _fail(command: str, exc: Exception) -> int:
    print(f"mpimap {command}: {exc}", file=sys.stderr)
    return 2


def _run(args) -> int:
    from . import _launch

    opts = _launch.RunOptions(
        script=args.script, args=args.args, nprocs=args.nprocs, launcher=args.launcher,
        mpiexec=args.mpiexec, python=args.python or sys.executable,
        launcher_args=args.launcher_arg, dry_run=args.dry_run)
    try:
        return _launch.run(opts)
    except _launch.LaunchError as exc:
        return _fail("run", exc)


def _env_pairs(items):
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r}: write NAME=VALUE")
        out[name] = value
    return out


def _sbatch(args) -> int:
    from . import _launch, _slurm

    try:
        opts = _slurm.SbatchOptions(
            script=os.path.abspath(args.script), args=args.args, job_name=args.job_name,
            nodes=args.nodes, ntasks=args.ntasks, ntasks_per_node=args.ntasks_per_node,
            cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
            account=args.account, mem=args.mem, output=args.output, error=args.error,
            chdir=args.chdir, modules=args.module, venv=args.venv, conda_env=args.conda_env,
            env=_env_pairs(args.env), setup=args.setup, extra_sbatch=args.extra_sbatch,
            signal=args.signal, launcher=args.launcher, launcher_args=args.launcher_arg,
            python=args.python or sys.executable, template=args.template)
        return _slurm.sbatch(opts, dry_run=args.dry_run, wait=args.wait,
                             wait_timeout=args.wait_timeout)
    except (_launch.LaunchError, ValueError) as exc:
        return _fail("sbatch", exc)


def _bundle_inspect(args) -> int:
    import json

    from . import _bundle
    from ._errors import MpimapError

    try:
        path = _bundle.find(args.target)
        manifest = _bundle.load_manifest(path)
    except (MpimapError, OSError, ValueError) as exc:
        return _fail("bundle inspect", exc)
    if args.path:
        print(path)
    else:
        json.dump(manifest, sys.stdout, indent=2)
        print()
    return 0


def _cache_ls(args) -> int:
    import json
    import time

    from . import _cache
    from ._errors import MpimapError

    try:
        root = _cache.cache_root()
    except MpimapError as exc:
        return _fail("cache ls", exc)
    entries = _cache.entries(root)
    if args.sort == "size":
        entries.sort(key=lambda e: (-e.size, e.id))
    else:  # least recently used first: the first candidates for a purge
        entries.sort(key=lambda e: (e.last_used, e.id))
    if args.json:
        json.dump({"cache": root, "node": _cache.node_name(),
                   "entries": [vars(e) for e in entries],
                   "total_bytes": sum(e.size for e in entries)}, sys.stdout, indent=2)
        print()
        return 0
    when = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    print(f"bundle cache {root} on node {_cache.node_name()}")
    if entries:
        print(f"{'ID':<14}{'SIZE':>11}{'FILES':>8}  {'LAST USED':<18}{'CREATED':<18}IN USE")
        for e in entries:
            print(f"{e.id[:12]:<14}{_cache.human(e.size):>11}{e.files:>8}  {when(e.last_used):<18}"
                  f"{when(e.created):<18}{'yes' if e.in_use else ''}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} bundle{'s' if len(entries) != 1 else ''}, {_cache.human(total)} in all"
          f"{f', {sum(e.in_use for e in entries)} in use' if any(e.in_use for e in entries) else ''}")
    return 0


def _cache_purge(args) -> int:
    from . import _cache
    from ._errors import MpimapError

    try:
        age = None if args.all else _cache.parse_age(args.older_than)
        root = _cache.cache_root()
        try:
            scratch = _cache.scratch_root()
        except MpimapError:
            scratch = None
    except (MpimapError, ValueError) as exc:
        return _fail("cache purge", exc)
    done = _cache.purge(root, older_than=age, everything=args.all, dry_run=args.dry_run,
                        scratch=scratch)
    verb = "would remove" if args.dry_run else "removed"
    for e in done["removed"]:
        print(f"{verb} {e.id[:12]}  {_cache.human(e.size)}")
    for path, n in done["stale"]:
        print(f"{verb} {path}  {_cache.human(n)} (left by a process that is gone)")
    for e in done["in_use"]:
        print(f"kept {e.id[:12]}: in use by a running job")
    print(f"{verb} {len(done['removed'])} bundle{'s' if len(done['removed']) != 1 else ''}, "
          f"{_cache.human(done['freed'])} on node {_cache.node_name()} ({root})")
    return 0


def _checkpoint_info(args) -> int:
    from . import _checkpoint
    from ._errors import CheckpointError

    try:
        print(_checkpoint.info(args.path))
    except CheckpointError as exc:
        return _fail("checkpoint info", exc)
    return 0


_LAUNCHER_HELP = ("auto (default; or $MPIMAP_LAUNCHER): srun inside a Slurm allocation, else the "
                  "mpiexec of the MPI library mpi4py loads; srun; mpiexec; hydra; openmpi")


def _add_launcher_options(p, *, sbatch: bool) -> None:
    if sbatch:
        p.add_argument("--launcher", default="srun", choices=("srun", "mpiexec", "hydra",
                                                              "openmpi"),
                       help="what starts the ranks inside the job (default srun, with the "
                            "--mpi plugin of mpi4py's MPI library; mpiexec: that library's "
                            "own mpiexec)")
    else:
        p.add_argument("--launcher", default="auto",
                       choices=("auto", "srun", "mpiexec", "hydra", "openmpi"),
                       help=_LAUNCHER_HELP)
        p.add_argument("--mpiexec", metavar="PATH",
                       help="the mpiexec/mpirun to use (default: found beside Python, in the MPI "
                            "library's prefix, then on PATH; or $MPIMAP_MPIEXEC)")
    p.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for the launcher, repeatable; write "
                        "--launcher-arg=--oversubscribe for one that starts with -")
    p.add_argument("--python", metavar="PATH",
                   help="the Python that runs the ranks (default: this one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpimap", description="Run Python scripts that call mpimap.pmap over MPI.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="print the version (-v: also Python, dill, MPI)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_version)

    p = sub.add_parser(
        "run", help="run a script on N ranks: rank 0 runs it, the others serve its maps",
        description="Start SCRIPT on N ranks with the launcher that matches the MPI library "
                    "mpi4py uses: srun --mpi=pmi2|pmix inside a Slurm allocation, else that "
                    "library's mpiexec, set up so that a rank that dies is reported by rank 0 "
                    "as WorkerLostError.")
    p.add_argument("-n", "--np", dest="nprocs", type=int, metavar="N",
                   help="number of ranks (inside a Slurm allocation: default every task)")
    _add_launcher_options(p, sbatch=False)
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run)

    p = sub.add_parser(
        "sbatch", help="render a Slurm batch script for SCRIPT and submit it",
        description="Render a batch script from a Jinja2 template (slurm_templates/) and "
                    "submit it with sbatch; print the job id. Slurm options left out are left "
                    "to Slurm's defaults.")
    g = p.add_argument_group("Slurm resources")
    g.add_argument("-J", "--job-name", help="default: the script's name")
    g.add_argument("-N", "--nodes")
    g.add_argument("-n", "--ntasks", type=int, help="number of ranks in all")
    g.add_argument("--ntasks-per-node", type=int)
    g.add_argument("-c", "--cpus-per-task", type=int)
    g.add_argument("-t", "--time", help="time limit, e.g. 01:00:00")
    g.add_argument("-p", "--partition")
    g.add_argument("-A", "--account")
    g.add_argument("--mem", help="memory per node, e.g. 8G")
    g.add_argument("-o", "--output", help="Slurm filename pattern for stdout (default "
                                          "JOBNAME-%%j.out; write %%%% for a literal %%)")
    g.add_argument("-e", "--error", help="filename pattern for stderr (default: the output)")
    g.add_argument("-D", "--chdir", help="working directory of the job")
    g.add_argument("--signal", metavar="[SIG@]SECONDS",
                   help="send every rank SIG this many seconds before the time limit (a warning "
                        "for scripts that handle it; default none). SIG defaults to the "
                        "launcher's (USR1; INT for hydra's mpiexec)")
    g.add_argument("--extra-sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH option, repeatable, e.g. --extra-sbatch=--gres=gpu:1")
    g = p.add_argument_group("environment of the job")
    g.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="`module load NAME` first (repeatable)")
    g.add_argument("--venv", metavar="DIR", help="activate this virtualenv")
    g.add_argument("--conda-env", metavar="NAME", help="activate this conda environment")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export a variable (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line to run before the launch (repeatable)")
    g = p.add_argument_group("launch")
    _add_launcher_options(g, sbatch=True)
    g.add_argument("--template", default="mpimap.sbatch.j2", metavar="NAME|PATH",
                   help="a Jinja2 template: one of mpimap's (slurm_templates/) or your own file")
    g.add_argument("--dry-run", action="store_true", help="print the script, do not submit it")
    g.add_argument("--wait", action="store_true",
                   help="wait for the job to end and exit with its exit code")
    g.add_argument("--wait-timeout", type=float, metavar="SECONDS",
                   help="with --wait: give up after this long (exit 2)")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_sbatch)

    p = sub.add_parser("bundle", help="look at a files=/modules= bundle")
    bsub = p.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    q = bsub.add_parser("inspect", help="print a bundle's manifest.json",
                        description="Print the manifest of a bundle in this node's cache (by id "
                                    "or unique id prefix) or at PATH: files with sizes, modes "
                                    "and sha256, shipped modules, detected imports, Python and "
                                    "mpimap versions.")
    q.add_argument("target", metavar="ID|PATH")
    q.add_argument("--path", action="store_true", help="print the bundle's directory instead")
    q.set_defaults(func=_bundle_inspect)

    p = sub.add_parser("cache", help="the node-local bundle cache on THIS node: ls, purge",
                       description="Act on the bundle cache of the node this runs on "
                                   "($MPIMAP_CACHE_DIR, default /tmp/mpimap-<uid>). To cover "
                                   "every node of an allocation run it once per node, e.g. "
                                   "`srun --ntasks-per-node=1 mpimap cache purge --all`.")
    csub = p.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    q = csub.add_parser("ls", help="list cached bundles with sizes, last use and totals")
    q.add_argument("--sort", choices=("used", "size"), default="used",
                   help="used (default): least recently used first; size: largest first")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_cache_ls)
    q = csub.add_parser("purge", help="remove bundles not used lately (never one in use)",
                        description="Remove cached bundles last used before --older-than (or "
                                    "all with --all). A bundle a running job uses is kept. Also "
                                    "removes staging and per-rank directories left on this node "
                                    "by processes that are gone.")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--older-than", metavar="AGE", help="e.g. 7d, 12h, 30m, 2w")
    g.add_argument("--all", action="store_true", help="every bundle not in use")
    q.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    q.set_defaults(func=_cache_purge)

    p = sub.add_parser("checkpoint", help="inspect a checkpoint file (checkpoint= of pmap)")
    csub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="COMMAND")
    q = csub.add_parser("info", help="done/total, failures, the function, runs and versions",
                        description="Print what checkpoint PATH holds: how many items are "
                                    "done, failed and missing, the function and inputs it "
                                    "belongs to, the runs that wrote it and their versions. "
                                    "Reads results a killed run left in PATH.journal too; "
                                    "changes no file.")
    q.add_argument("path", metavar="PATH")
    q.set_defaults(func=_checkpoint_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
