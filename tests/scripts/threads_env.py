import json
import os

import mpimap

VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def probe(_):
    return {v: os.environ.get(v) for v in VARS}


print(json.dumps({"rank0": probe(0), "workers": mpimap.pmap(probe, range(2), chunksize=1)}))
