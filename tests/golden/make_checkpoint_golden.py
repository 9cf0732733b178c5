"""Writes tests/golden/checkpoint_v1.h5: a checkpoint as this version of mpimap leaves it.

    python tests/golden/make_checkpoint_golden.py

Kept in the repository so that later versions prove they still read and resume it
(tests/unit/test_checkpoint.py::test_golden_checkpoint_v1_loads_and_resumes). Run it only for a
new checkpoint format (then as checkpoint_v2.h5, keeping v1). The map is stopped after 30 of 40
items, so the file has native tuple fields, pickled dicts, recorded failures and missing items.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "unit"))
os.environ["MPIMAP_SERIAL"] = "1"

import mpimap  # noqa: E402
from test_checkpoint import golden_task  # noqa: E402

if __name__ == "__main__":
    path = os.path.join(HERE, "checkpoint_v1.h5")
    for suffix in ("", ".journal"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    it = mpimap.imap(golden_task, range(40), errors="return", checkpoint=path)
    for _ in range(30):
        next(it)
    it.close()
    print(mpimap._checkpoint.info(path))
