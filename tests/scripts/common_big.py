"""A single 2.5 GiB array as common data, then as a result: no size limit either way."""
import json

import numpy as np

import mpimap
from mpimap import _shm

N = int(2.5 * (1 << 30)) // 8


def check(_i, c):
    return [float(c[0]), float(c[-1]), float(c[::4096].sum()), int(c.nbytes),
            not c.flags.writeable]


def make(_i):
    a = np.empty(N)
    a[:] = 1.5
    return a


big = np.arange(N, dtype=np.float64)
out = {"expected_common": [0.0, float(N - 1), float(big[::4096].sum()), int(big.nbytes), True]}
out["common"] = mpimap.pmap(check, [0], common=big)[0]
del big
res = mpimap.pmap(make, [0])[0]
out["result_ok"] = bool(res.nbytes == N * 8 and res[0] == 1.5 and res[-1] == 1.5
                        and float(res[::4096].sum()) == 1.5 * len(res[::4096]))
del res
out["leftovers"] = _shm.leftovers()
print(json.dumps(out), flush=True)
