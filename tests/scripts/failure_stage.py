"""One row of the failure-stage matrix; prints the type and message rank 0 saw."""
import os
import sys

import mpimap

STAGE = sys.argv[1]


class OnlyOnRank0:
    """Unpickles only in the process that runs the script (rank 0 under -m mpimap)."""

    def __reduce__(self):
        return (_check_rank0, (os.getpid(),))


def _check_rank0(pid):
    if os.getpid() != pid:
        raise ImportError("No module named 'lab_instrument_driver'")
    return OnlyOnRank0()


class NotOnRank0:
    def __reduce__(self):
        return (_refuse_on, (os.getpid(),))


def _refuse_on(pid):
    if os.getpid() == RANK0_PID:
        raise ValueError("this result cannot be rebuilt on rank 0")
    return NotOnRank0()


RANK0_PID = os.getpid()
gen = (i for i in range(3))
trap = OnlyOnRank0()


def pickle_task(x):
    return next(gen)


def unpickle_task(x):
    return (trap, x)[1]


def run_task(x):
    if x == 3:
        raise ZeroDivisionError("task 3 divided by zero")
    return x


def pickle_result(x):
    return (i for i in range(x))


def unpickle_result(x):
    return NotOnRank0()


funcs = {"pickle_task": pickle_task, "unpickle_task": unpickle_task, "run": run_task,
         "pickle_result": pickle_result, "unpickle_result": unpickle_result}
try:
    mpimap.pmap(funcs[STAGE], range(6))
except Exception as exc:
    print(f"CAUGHT {type(exc).__module__}.{type(exc).__name__}: {exc}")
    print("CAUSE", type(exc.__cause__).__name__ if exc.__cause__ else None)
# The pool must stay usable after every failure.
print("AFTER", mpimap.pmap(abs, [-5]))
