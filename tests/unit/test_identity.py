"""Canonical digests: what counts as the same item and the same function (mpimap._identity)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest

from mpimap._identity import digest, digest_items, function_identity


def test_equal_values_of_the_same_type_have_the_same_digest():
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})           # dict order: as ==
    assert digest({3, 1, 2}) == digest({2, 3, 1})
    assert digest(frozenset("xyz")) == digest(frozenset("zyx"))
    assert digest(float("nan")) == digest(float("nan"))                     # every NaN is NaN
    assert digest(np.arange(6.0).reshape(2, 3)) == digest(np.arange(6.0).reshape(2, 3))
    # a non-contiguous view is its values in C order
    a = np.arange(12.0).reshape(3, 4)
    assert digest(a[:, ::2]) == digest(np.ascontiguousarray(a[:, ::2]))


@pytest.mark.parametrize("a, b", [
    (1, 1.0), (True, 1), (0.0, -0.0), ("1", 1), (b"x", "x"), ((1, 2), [1, 2]),
    ({1, 2}, frozenset({1, 2})), (np.float32(1), np.float64(1)),
    (np.arange(3, dtype=np.int32), np.arange(3, dtype=np.int64)),
    (np.zeros((2, 3)), np.zeros((3, 2))), (np.zeros(3), [0.0, 0.0, 0.0]),
    (OrderedDict(a=1), {"a": 1}), (None, 0),
])
def test_different_values_or_types_differ(a, b):
    assert digest(a) != digest(b)


@dataclasses.dataclass
class Params:
    rate: float
    tags: set


class Plain:
    def __init__(self, x):
        self.x = x
        self.seen = {"u", "v", "w"}


def test_objects_count_by_class_and_state():
    assert digest(Params(1.5, {"a", "b"})) == digest(Params(1.5, {"b", "a"}))
    assert digest(Params(1.5, {"a"})) != digest(Params(2.5, {"a"}))
    assert digest(Plain(3)) == digest(Plain(3))
    assert digest(Plain(3)) != digest(Plain(4))


def test_cycles_terminate():
    x: list = [1]
    x.append(x)
    assert digest(x) == digest(x)
    y: dict = {}
    y["self"] = y
    assert len(digest(y)) == 16


def test_digest_items_is_the_concatenation():
    items = [1, "a", (2, 3.0)]
    assert digest_items(items) == b"".join(digest(i) for i in items)


# -- functions ------------------------------------------------------------------------------------

def _fn(source: str, name: str = "f", env: dict | None = None):
    """Define a function from source in a fake script module, the way a script's would be."""
    import linecache

    filename = f"<script-{abs(hash(source))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    g = {"__name__": "__main__", **(env or {})}
    exec(compile(source, filename, "exec"), g)
    return g[name], g


def test_comments_and_blank_lines_do_not_change_a_function():
    f1, _ = _fn("def f(x):\n    return x + 1\n")
    f2, _ = _fn("def f(x):\n    # add one\n\n    return x + 1   # done\n")
    assert digest(f1) == digest(f2)


def test_code_globals_helpers_closures_and_defaults_count():
    base, _ = _fn("K = 2\ndef h(x):\n    return x * K\ndef f(x, d=1):\n    return h(x) + d\n")
    same, _ = _fn("K = 2\ndef h(x):\n    return x * K\ndef f(x, d=1):\n    return h(x) + d\n")
    assert digest(base) == digest(same)
    for changed in (
        "K = 3\ndef h(x):\n    return x * K\ndef f(x, d=1):\n    return h(x) + d\n",  # a global
        "K = 2\ndef h(x):\n    return x * K + 0\ndef f(x, d=1):\n    return h(x) + d\n",  # helper
        "K = 2\ndef h(x):\n    return x * K\ndef f(x, d=2):\n    return h(x) + d\n",  # default
        "K = 2\ndef h(x):\n    return x * K\ndef f(x, d=1):\n    return h(x) - d\n",  # code
    ):
        other, _ = _fn(changed)
        assert digest(base) != digest(other), changed

    def make(k):
        def g(x):
            return x * k
        return g

    assert digest(make(2)) == digest(make(2)) != digest(make(3))  # closure values


def test_recursive_functions_and_script_classes():
    fact, _ = _fn("def f(n):\n    return 1 if n < 2 else n * f(n - 1)\n")
    assert len(digest(fact)) == 16
    c1, _ = _fn("class M:\n    def go(self):\n        return 1\ndef f(x):\n    return M().go()\n")
    c2, _ = _fn("class M:\n    def go(self):\n        return 2\ndef f(x):\n    return M().go()\n")
    assert digest(c1) != digest(c2)


def test_library_functions_count_by_name():
    assert digest(np.sin) == digest(np.sin) != digest(np.cos)
    assert digest(json.dumps) != digest(json.loads)
    ident = function_identity(json.dumps)
    assert ident["name"] == "dumps"


SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from mpimap._identity import digest, digest_items, function_identity
    WORDS = {{"alpha", "beta", "gamma", "delta", "epsilon"}}
    INDEX = {{w: len(w) for w in WORDS}}          # a dict built by iterating a set
    def score(item):
        return sum(INDEX.get(w, 0) for w in item) + ("alpha" in WORDS) + (len(item) in {{1, 2, 3}})
    items = [{{"alpha", "zeta"}}, frozenset({{"beta", "gamma", "x"}}), {{"k": {{1, 2, 3}}}}]
    print(json.dumps([function_identity(score)["digest"], digest_items(items).hex(),
                      digest(INDEX).hex()]))
""")


def test_digests_are_the_same_in_fresh_processes_with_other_hash_seeds(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "seeded.py"
    script.write_text(SCRIPT.format(root=root))
    outs = []
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.append(subprocess.run([sys.executable, str(script)], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert outs[0] == outs[1] == outs[2], outs
    # ...whereas pickle bytes of the same set-valued objects do differ between those processes
    probe = "import pickle,sys; sys.stdout.buffer.write(pickle.dumps({'alpha','beta','gamma'}))"
    raw = {subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONHASHSEED=s),
                          check=True, capture_output=True).stdout for s in ("0", "1", "2", "3")}
    assert len(raw) > 1
