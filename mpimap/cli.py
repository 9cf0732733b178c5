"""The ``mpimap`` command: argument parsing only; the work is done elsewhere."""

from __future__ import annotations

import argparse
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


def _run(args) -> int:
    from . import _launch

    return _launch.run(args.nprocs, args.script, args.args, dry_run=args.dry_run,
                       launcher_args=args.launcher_arg)


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
                    "mpi4py uses. A rank that dies is reported as WorkerLostError by rank 0.")
    p.add_argument("-n", "--np", dest="nprocs", type=int, required=True, metavar="N",
                   help="number of ranks (1 runs the script in-process)")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the launcher (repeatable)")
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
