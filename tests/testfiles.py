"""Files the tests build or read: the project folder that tests/scripts/bundle_project.py runs
in, and the marker files the checkpoint scripts leave (one per computation of an item)."""

from __future__ import annotations

import os
from pathlib import Path


def bundle_project(root: Path, nfiles: int, unit: int) -> Path:
    """root/proj with data/f<i>.bin (random, (i+1)*unit bytes), src/ (local modules only rank 0
    has on sys.path: helpers imports helpers2) and plugins/ (modules imported by name)."""
    p = root / "proj"
    (p / "data").mkdir(parents=True)
    (p / "src").mkdir()
    (p / "plugins").mkdir()
    for i in range(nfiles):
        (p / "data" / f"f{i}.bin").write_bytes(os.urandom(unit * (i + 1)))
    (p / "src" / "helpers.py").write_text(
        "import hashlib\nimport helpers2\n\ndef digest(b):\n"
        "    return helpers2.tag() + hashlib.sha256(b).hexdigest()\n")
    (p / "src" / "helpers2.py").write_text("def tag():\n    return 'v1:'\n")
    (p / "plugins" / "plugin_a.py").write_text("VALUE = 'a'\n")
    (p / "plugins" / "plugin_b.py").write_text("VALUE = 'b'\n")
    return p


def computed(marks) -> dict:
    """item -> how many times it was computed, from the files ``<item>.<anything>`` in marks."""
    out: dict = {}
    for name in os.listdir(marks):
        x = int(name.split(".")[0])
        out[x] = out.get(x, 0) + 1
    return out
