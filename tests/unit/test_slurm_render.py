"""`mpimap sbatch` rendering: golden files, hostile names, the template contract.

Regenerate the golden files after an intended change with
    MPIMAP_REGEN_GOLDEN=1 python -m pytest tests/unit/test_slurm_render.py
and review the diff. Real submission is tested in tests/slurm/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mpimap
from mpimap import _slurm
from mpimap._launch import LaunchError
from mpimap._slurm import SbatchOptions, render

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PY = "/opt/py/bin/python"
SCRIPT = "/home/user/project/run.py"
HOSTILE = ["a b", "it's", 'say "hi"', "$HOME", "`date`", "%j", "100%", "back\\slash",
           "two\nlines", "--x", "", "*", "; rm -rf /"]


@pytest.fixture(autouse=True)
def fixed_version(monkeypatch):
    monkeypatch.setattr(mpimap, "__version__", "X.Y.Z")


CASES = {
    "minimal": dict(script=SCRIPT, python=PY),
    "full": dict(
        script=SCRIPT, args=["--steps", "100", "out dir/"], python=PY, job_name="sweep",
        nodes=2, ntasks_per_node=32, cpus_per_task=2, time="01:30:00", partition="compute",
        account="proj-123", mem="64G", output="logs/%x-%j.out", error="logs/%x-%j.err",
        chdir="/scratch/user/run1", modules=["gcc/12.2", "openmpi/4.1"], venv="/home/user/venv",
        env={"OMP_NUM_THREADS": "2", "MY_DATA": "/data/set 1"}, setup=["ulimit -c 0"],
        extra_sbatch=["--gres=gpu:1", "--exclusive"], signal="USR1@120",
        launcher_args=["--overlap"]),
    "hydra_conda": dict(
        script=SCRIPT, python=PY, launcher="hydra", conda_env="science", ntasks=3, time="30",
        signal="300", modules=["miniconda3"]),
    "hostile": dict(
        script="/home/user/my dir $x 'q' \"dq\" 100%/run me.py", args=HOSTILE, python=PY,
        job_name="name with 100% $HOME 'q' \"dq\" back\\slash",
        chdir="/scratch/it's \"here\" $HOME", output="/logs dir/%x %j 100%%.out",
        venv="/home/user/my venv $1", env={"QUOTED": "it's \"x\" $HOME `y` %j"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    text = render(SbatchOptions(**CASES[name]))
    path = GOLDEN / f"sbatch_{name}.sh"
    if os.environ.get("MPIMAP_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with MPIMAP_REGEN_GOLDEN=1 once"
    assert text == path.read_text(), (
        f"rendering of {name!r} changed; if intended, rerun with MPIMAP_REGEN_GOLDEN=1 and "
        f"review the diff of {path}")


def test_rendering_is_pure():
    opts = SbatchOptions(**CASES["full"])
    assert render(opts) == render(opts)


# -- #SBATCH lines: quoted as sbatch reads them ----------------------------------------------------

def _sbatch_unquote(value: str) -> str:
    """How sbatch reads one #SBATCH option value (double quotes, backslash escapes)."""
    if not value.startswith('"'):
        return value
    assert value.endswith('"')
    return re.sub(r"\\(.)", r"\1", value[1:-1])


def _directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH --([\w-]+)=(.*)$", line)
        if m:
            out[m.group(1)] = _sbatch_unquote(m.group(2))
    return out


def test_hostile_values_round_trip_through_sbatch_quoting():
    opts = SbatchOptions(**CASES["hostile"])
    d = _directives(render(opts))
    assert d["job-name"] == opts.job_name
    assert d["chdir"] == opts.chdir
    assert d["output"] == opts.output              # the user's own pattern, untouched


def test_percent_in_a_literal_becomes_double_percent_in_a_filename_pattern():
    d = _directives(render(SbatchOptions(script=SCRIPT, python=PY, job_name="100% done")))
    assert d["output"] == "100%% done-%j.out"
    assert d["job-name"] == "100% done"            # not a pattern: left alone


@pytest.mark.parametrize("field", ["job_name", "output", "error", "chdir", "partition"])
def test_a_line_break_cannot_reach_an_sbatch_line(field):
    with pytest.raises(LaunchError, match="line break"):
        render(SbatchOptions(script=SCRIPT, python=PY, **{field: "a\nb"}))


# -- the shell part: run it with bash, with a stand-in python that records what it got ------------

def test_hostile_script_runs_with_exact_arguments_and_environment(tmp_path):
    weird = tmp_path / "dir with 'q' \"dq\" $HOME 100%"
    weird.mkdir()
    record = tmp_path / "record.json"
    stub = weird / "python stub"
    stub.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'QUOTED': os.environ.get('QUOTED'), "
                    f"'ACTIVE': os.environ.get('ACTIVE'), 'SETUP': os.environ.get('SETUP')}}, "
                    f"open({str(record)!r}, 'w'))\n")
    stub.chmod(0o755)
    venv = weird / "venv $1"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export ACTIVE=yes\n")
    opts = SbatchOptions(
        script=str(weird / "run me $x.py"), args=HOSTILE, python=str(stub), venv=str(venv),
        env={"QUOTED": "it's \"x\" $HOME `y` %j\\"}, setup=['export SETUP="$QUOTED"'],
        launcher_args=["--overlap --x='1'"])
    batch = tmp_path / "job.sh"
    batch.write_text(render(opts))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(batch)], capture_output=True, text=True, env=env,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == ["-m", "mpimap.cli", "run", "--launcher", "srun",
                           "--launcher-arg=--overlap --x='1'", "--", opts.script, *HOSTILE]
    assert got["QUOTED"] == got["SETUP"] == opts.env["QUOTED"]
    assert got["ACTIVE"] == "yes"


def test_the_final_command_is_execed():
    text = render(SbatchOptions(script=SCRIPT, python=PY))
    last = [line for line in text.splitlines() if line and not line.startswith("#")][-1]
    assert last.startswith(f"exec {PY} -m mpimap.cli run --launcher srun -- {SCRIPT}")


# -- the warning signal ------------------------------------------------------------------------

@pytest.mark.parametrize("launcher,spec,line", [
    ("srun", "120", "#SBATCH --signal=USR1@120"),
    ("srun", "TERM@60", "#SBATCH --signal=TERM@60"),
    ("hydra", "300", "#SBATCH --signal=B:INT@300"),
    ("hydra", "SIGTERM@300", "#SBATCH --signal=B:TERM@300"),
    ("openmpi", "USR2@90", "#SBATCH --signal=B:USR2@90"),
])
def test_warning_signal_follows_the_launcher(launcher, spec, line):
    text = render(SbatchOptions(script=SCRIPT, python=PY, launcher=launcher, signal=spec))
    assert line in text.splitlines()


def test_no_warning_signal_by_default():
    assert "--signal" not in render(SbatchOptions(script=SCRIPT, python=PY))


@pytest.mark.parametrize("kw,needle", [
    (dict(launcher="hydra", signal="USR1@60"), "use --signal INT@60"),
    (dict(launcher="hydra", signal="USR2@60"), "forwards TERM, INT"),
    (dict(launcher="openmpi", signal="TERM@60"), "forwards USR1, USR2"),
    (dict(launcher="mpiexec", signal="60"), "--launcher hydra"),
    (dict(signal="B:USR1@60"), "leave out 'B:'"),
    (dict(signal="KILL@60"), "unknown signal"),
    (dict(signal="USR1@soon"), "whole seconds"),
    (dict(signal="USR1@600", time="10:00"), "before the job starts"),
    (dict(time="1:2:3:4"), "not a Slurm time"),
    (dict(venv="/v", conda_env="c"), "not both"),
    (dict(env={"BAD-NAME": "1"}), "not a valid environment variable"),
    (dict(extra_sbatch=["gres=gpu:1"]), "must be an sbatch option"),
    (dict(setup=["a\nb"]), "one shell line"),
    (dict(ntasks=0), "at least 1"),
    (dict(launcher="mpirun"), "choose one of"),
    (dict(template="no-such-template.j2"), "neither a file nor"),
])
def test_bad_options_name_the_fix(kw, needle):
    with pytest.raises(LaunchError, match=re.escape(needle)):
        render(SbatchOptions(script=SCRIPT, python=PY, **kw))


@pytest.mark.parametrize("text,seconds", [
    ("30", 1800), ("30:15", 1815), ("01:30:00", 5400), ("2-0", 172800), ("1-12:30", 131400),
    ("1-00:00:10", 86410), ("UNLIMITED", None),
])
def test_time_seconds(text, seconds):
    assert _slurm.time_seconds(text) == seconds


# -- templates: StrictUndefined, user templates ----------------------------------------------------

def test_a_user_template_with_a_typo_fails_and_lists_the_names(tmp_path):
    mine = tmp_path / "my.sbatch.j2"
    mine.write_text("#!/bin/bash\n#SBATCH --nodes={{ nodez }}\n")
    with pytest.raises(LaunchError) as info:
        render(SbatchOptions(script=SCRIPT, python=PY, template=str(mine)))
    assert "nodez" in str(info.value) and "ntasks_per_node" in str(info.value)


def test_a_user_template_can_extend_or_copy_the_builtin(tmp_path):
    builtin = (_slurm.data_dir("slurm_templates") / "mpimap.sbatch.j2").read_text()
    copy = tmp_path / "copy.sbatch.j2"
    copy.write_text(builtin.replace("set -e\n", "set -e\necho my site setup\n"))
    text = render(SbatchOptions(script=SCRIPT, python=PY, template=str(copy)))
    assert "echo my site setup" in text
    assert text.replace("echo my site setup\n", "") == render(SbatchOptions(script=SCRIPT,
                                                                            python=PY))
    child = tmp_path / "child.sbatch.j2"
    child.write_text('{% extends "mpimap.sbatch.j2" %}')
    assert render(SbatchOptions(script=SCRIPT, python=PY, template=str(child))) == \
        render(SbatchOptions(script=SCRIPT, python=PY))


def test_with_an_environment_to_activate_the_rank_python_is_its_python():
    text = render(SbatchOptions(script=SCRIPT, venv="/v"))
    assert "\nexec python -m mpimap.cli run" in text


# -- scontrol output and exit codes --------------------------------------------------------------

def test_parse_show_job_and_exit_status():
    line = ("JobId=12 JobName=x UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "ExitCode=7:0 RunTime=00:00:01 StdOut=/tmp/x-12.out")
    fields = _slurm.parse_show_job(line)
    assert fields["JobState"] == "FAILED" and fields["StdOut"] == "/tmp/x-12.out"
    assert _slurm.exit_status(fields) == 7
    assert _slurm.exit_status({"JobState": "CANCELLED", "ExitCode": "0:15"}) == 143
    assert _slurm.exit_status({"JobState": "TIMEOUT", "ExitCode": "0:0"}) == 1
    assert _slurm.exit_status({"JobState": "COMPLETED", "ExitCode": "0:0"}) == 0


# -- the command -----------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MPIMAP_"))}
    return subprocess.run([sys.executable, "-m", "mpimap.cli", "sbatch", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env=env)


def test_cli_dry_run_prints_the_script(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("pass\n")
    res = _cli("--dry-run", "-N", "2", "--ntasks-per-node", "4", "-t", "10", "--module", "gcc",
               "--env", "A=1 2", "--signal", "60", "--python", PY, str(script), "x y",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    expected = render(SbatchOptions(
        script=str(script), args=["x y"], nodes="2", ntasks_per_node=4, time="10",
        modules=["gcc"], env={"A": "1 2"}, signal="60", python=PY))
    unversioned = re.compile(r"\(mpimap [^)]*\)")
    assert unversioned.sub("", res.stdout) == unversioned.sub("", expected)


def test_cli_errors_name_the_fix(tmp_path):
    res = _cli("--dry-run", str(tmp_path / "missing.py"))
    assert res.returncode == 2 and "cannot find the script" in res.stderr
    script = tmp_path / "job.py"
    script.write_text("pass\n")
    res = _cli("--dry-run", "--env", "NOEQUALS", str(script))
    assert res.returncode == 2 and "NAME=VALUE" in res.stderr
