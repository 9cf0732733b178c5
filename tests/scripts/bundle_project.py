"""Run from a project folder made by tests/mpi/test_bundle_mpi.py: data/, src/ (local modules
that only rank 0 has on sys.path), plugins/. Prints one JSON line of what happened."""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "src"))  # rank 0 only: workers never run this
sys.path.insert(0, os.path.join(os.getcwd(), "plugins"))
import helpers  # noqa: E402  (local, not installed: detected and shipped)

import mpimap  # noqa: E402
from mpimap import _runtime  # noqa: E402

MODE = sys.argv[1]


def task(name):
    with open(name, "rb") as fh:
        data = fh.read()
    os.makedirs("out", exist_ok=True)
    with open(f"out/{os.path.basename(name)}.sum", "w") as fh:
        fh.write(helpers.digest(data))
    t = mpimap.task()
    with open(os.path.join(t.scratch, "tmp"), "w") as fh:
        fh.write("x")
    return {"name": name, "sum": helpers.digest(data), "helpers": helpers.__file__,
            "node": t.node, "rank": t.rank, "cwd": os.getcwd(), "scratch": t.scratch}


def plugin(name):
    return importlib.import_module(name).VALUE  # not visible in the code: needs modules=


def late(i):
    marks = os.environ["MARKS"]
    if i == 0:  # fail once the other item surely runs
        deadline = time.time() + 20
        while time.time() < deadline and not os.path.exists(f"{marks}/started1"):
            time.sleep(0.01)
        raise RuntimeError("item 0 fails while item 1 runs")
    open(f"{marks}/started{i}", "w").close()
    time.sleep(0.5)
    with open(f"late{i}.txt", "w") as fh:
        fh.write(f"late {i}")
    return i


def log():
    return _runtime._state.engine.bundles.log


names = sorted(os.path.join("data", n) for n in os.listdir("data"))
doc = {}
if MODE == "basic":
    first = mpimap.pmap(task, names, files=["data"], chunksize=1)
    second = mpimap.pmap(task, names, files=["data"], chunksize=1)
    try:
        mpimap.pmap(task, ["data/missing.bin"], files=["data"])
    except FileNotFoundError as exc:
        doc["fnf"] = str(exc)
    doc.update(first=first, second=second, log=log(),
               expected={n: helpers.digest(open(n, "rb").read()) for n in names},
               scratch_left=[r["scratch"] for r in first if os.path.exists(r["scratch"])],
               outs=sorted(os.listdir("out")))
elif MODE == "modules-change":
    before = mpimap.pmap(task, names[:2], files=["data"])
    with open("src/helpers2.py", "w") as fh:
        fh.write("def tag():\n    return 'v2:'\n")
    after = mpimap.pmap(task, names[:2], files=["data"])
    doc.update(before=[r["sum"][:3] for r in before], after=[r["sum"][:3] for r in after])
elif MODE == "plugins":
    try:
        mpimap.pmap(plugin, ["plugin_a"])
    except mpimap.SerializationError as exc:
        doc["without"] = type(exc).__name__ + ": " + str(exc)
    except ModuleNotFoundError as exc:
        doc["without"] = "ModuleNotFoundError: " + str(exc)
    doc["with"] = mpimap.pmap(plugin, ["plugin_a", "plugin_b"], modules=["plugin_a", "plugin_b"])
elif MODE == "slurm":
    first = mpimap.pmap(task, names, files=["data"], chunksize=1)
    second = mpimap.pmap(task, names, files=["data"], chunksize=1)
    doc.update(first=first, second=second, log=log(),
               expected={n: helpers.digest(open(n, "rb").read()) for n in names},
               driver_node=os.environ.get("SLURMD_NODENAME"),
               scratch_left=[r["scratch"] for r in first if os.path.exists(r["scratch"])])
elif MODE == "late":
    try:
        mpimap.pmap(late, range(2), files=["data"], chunksize=1)
    except RuntimeError as exc:
        doc["error"] = str(exc)
print(json.dumps(doc))
