"""Everything a scientist's script sends across ranks; prints one JSON line on rank 0."""
import json

import numpy as np

import mpimap

OFFSET = 100  # a module global read by a task


class Particle:  # a class defined in the script's __main__
    def __init__(self, x):
        self.x = x


class BadParticle(Exception):
    pass


def top_level(x):
    return x * 2 + OFFSET


def calls_later(x):
    return defined_later(x) + 1


def make_particle(p):
    if not isinstance(p, Particle):
        raise TypeError("expected a Particle")
    if p.x < 0:
        raise BadParticle(f"negative: {p.x}")
    return Particle(p.x * 10)


def main():
    k = 3
    out = {}
    out["top_level"] = mpimap.pmap(top_level, range(10))
    out["lambda"] = mpimap.pmap(lambda x: x ** 2, range(10))
    out["closure"] = mpimap.pmap(lambda x: x * k, range(10))
    out["later"] = mpimap.pmap(calls_later, range(5))
    res = mpimap.pmap(make_particle, [Particle(i) for i in range(5)])
    out["main_class_results"] = [isinstance(r, Particle) and r.x for r in res]
    try:
        mpimap.pmap(make_particle, [Particle(1), Particle(-1)])
    except BadParticle as exc:
        out["main_class_exception"] = str(exc)
    out["common"] = mpimap.pmap(lambda x, c: float(c["w"][x]), range(4), common={"w": np.arange(4.0)})
    out["multi"] = mpimap.pmap(lambda a, b: a - b, range(5), range(10, 15))
    out["rng"] = mpimap.pmap(lambda x: float(mpimap.rng().random()), range(6), seed=7)
    out["unordered"] = sorted(mpimap.pmap(top_level, range(50), ordered=False))
    out["imap"] = list(mpimap.imap(top_level, iter(range(20))))
    out["array_items"] = mpimap.pmap(lambda v: float(v.sum()), [np.ones(3) * i for i in range(4)])
    ranks = set(mpimap.pmap(lambda x: mpimap.task().rank, range(40), chunksize=1))
    out["ranks"] = sorted(ranks)
    print(json.dumps(out, sort_keys=True))


def defined_later(x):
    return x * 1000


if __name__ == "__main__":
    main()
