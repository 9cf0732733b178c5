"""launchers/ and slurm_templates/ are top-level folders here and ship inside the wheel."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
OFFLINE = re.compile(r"No matching distribution|Could not find a version|NewConnectionError|"
                     r"Temporary failure in name resolution|Network is unreachable|"
                     r"ConnectionError|Failed to establish a new connection", re.I)


@pytest.mark.slow
def test_the_wheel_carries_the_data_folders(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    for name in ("mpimap", "launchers", "slurm_templates"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not (src / "README.md").exists():
        (src / "README.md").write_text("mpimap\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w",
                           str(tmp_path / "dist"), "-q"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0 and OFFLINE.search(proc.stdout + proc.stderr):
        pytest.skip(f"pip cannot fetch the build backend (offline?):\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheel, = (tmp_path / "dist").glob("mpimap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pattern in (("launchers", "*.ini"), ("slurm_templates", "*.j2")):
        expected = {f"mpimap/{folder}/{p.name}" for p in (ROOT / folder).glob(pattern)}
        assert expected and expected <= names, sorted(names)

    # and the installed copy reads them through importlib.resources
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    probe = ("import mpimap, mpimap._launch as L, mpimap._slurm as S; "
             "print(mpimap.__file__); print(L.data_dir('launchers')); "
             "print(sorted(L.load_launchers())); print(S.builtin_templates())")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target)), lines
    assert lines[2] == "['hydra', 'openmpi', 'srun']" and "mpimap.sbatch.j2" in lines[3]
