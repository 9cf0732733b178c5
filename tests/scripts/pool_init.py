"""Pool initializer globals, persistent workers, and changed functions on a warm pool."""
import json
import os

import numpy as np

import mpimap

model = None  # set on every worker by the initializer
SCALE = 1


def load_model(path):
    global model
    model = {"path": path, "weights": np.arange(3.0)}


def predict(x):
    return float(model["weights"].sum() * x * SCALE)


out = {}
with mpimap.Pool(initializer=load_model, initargs=("model.bin",)) as pool:
    out["first"] = pool.map(predict, [1, 2])
    pids1 = set(pool.map(lambda x: os.getpid(), range(10), chunksize=1))
    SCALE = 10  # a rebound global is noticed by the next map
    out["second"] = pool.map(predict, [1, 2])
    pids2 = set(pool.map(lambda x: os.getpid(), range(10), chunksize=1))
    out["same_workers"] = pids1 == pids2 and os.getpid() not in pids1
print(json.dumps(out))
