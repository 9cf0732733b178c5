"""mpimap run's decisions as pure functions, the launcher data files, the one _call(), and the
launcher/MPI mismatch rules. Real launches are in test_launch_mpiexec.py and tests/slurm/."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mpimap import _env, _launch
from mpimap._launch import (CommandError, LaunchError, Library, RunOptions, _call, build_argv,
                            choose_launcher, family_of, load_launchers)

MPICH = Library("mpich", "MPICH Version: 5.0.2", "/venv/lib/libmpi.so.12")
OMPI = Library("openmpi", "Open MPI v4.1.4, package: Debian OpenMPI",
               "/usr/lib/x86_64-linux-gnu/libmpi.so.40")
ODD = Library("unknown", "Fancy MPI 1.0")


@pytest.fixture(scope="module")
def launchers():
    return load_launchers()


# -- the data files ------------------------------------------------------------------------------

def test_launcher_files_load_and_say_what_they_start(launchers):
    assert sorted(launchers) == ["hydra", "openmpi", "srun"]
    for launcher in launchers.values():
        assert "{program}" in launcher.command and "{script}" in launcher.command
        assert launcher.rank_death, launcher.source
        assert launcher.warning_route in ("batch", "step")
    assert launchers["hydra"].families == ("mpich",)
    assert launchers["openmpi"].families == ("openmpi",)
    assert dict(launchers["srun"].pmi) == {"mpich": "pmi2", "openmpi": "pmix"}
    # hydra: USR2 kills mpiexec, USR1 collides with MPICH's failure notice
    assert "USR2" not in launchers["hydra"].forwarded
    assert "USR1" not in launchers["hydra"].forwarded
    assert launchers["hydra"].sbatch_prefix == "B:" and launchers["srun"].sbatch_prefix == ""


def test_a_broken_launcher_file_is_named():
    with pytest.raises(LaunchError, match="my.ini lacks"):
        _launch.parse_launcher("[launcher]\nname = x\n", "my.ini")


def test_data_dir_finds_both_folders():
    assert (_launch.data_dir("launchers") / "srun.ini").is_file()
    assert (_launch.data_dir("slurm_templates") / "mpimap.sbatch.j2").is_file()


# -- which library, which launcher ---------------------------------------------------------------

@pytest.mark.parametrize("text,family", [
    ("MPICH Version:      5.0.2\nMPICH Release date: ...", "mpich"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS", "mpich"),
    ("MVAPICH2 Version : 2.3.7", "mpich"),
    ("Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4", "openmpi"),
    ("Microsoft MPI 10.1", "unknown"),
])
def test_family_of(text, family):
    assert family_of(text) == family


def test_library_prefix_for_a_venv_and_a_multiarch_path():
    assert MPICH.prefix == "/venv"
    assert OMPI.prefix == "/usr"
    assert Library("mpich", "x", "").prefix is None


@pytest.mark.parametrize("library,environ,expected", [
    (MPICH, {}, "hydra"),
    (OMPI, {}, "openmpi"),
    (MPICH, {"SLURM_JOB_ID": "12"}, "srun"),
    (OMPI, {"SLURM_JOB_ID": "12"}, "srun"),
])
def test_auto_picks_srun_inside_an_allocation_else_the_librarys_mpiexec(
        launchers, library, environ, expected):
    assert choose_launcher("auto", environ, library, launchers).name == expected


def test_mpiexec_inside_an_allocation_when_asked(launchers):
    assert choose_launcher("mpiexec", {"SLURM_JOB_ID": "1"}, MPICH, launchers).name == "hydra"


def test_asking_for_the_other_mpis_launcher_is_a_mismatch(launchers):
    with pytest.raises(LaunchError, match="separate world of one"):
        choose_launcher("openmpi", {}, MPICH, launchers)
    with pytest.raises(LaunchError, match="separate world of one"):
        choose_launcher("hydra", {}, OMPI, launchers)


def test_unknown_library_names_the_way_out(launchers):
    with pytest.raises(LaunchError, match="--launcher hydra"):
        choose_launcher("auto", {}, ODD, launchers)
    with pytest.raises(LaunchError, match="--launcher mpiexec"):
        choose_launcher("auto", {"SLURM_JOB_ID": "3"}, ODD, launchers)
    with pytest.raises(LaunchError, match="choose one of"):
        choose_launcher("mpich", {}, MPICH, launchers)


# -- the command line ------------------------------------------------------------------------------

def _opts(**kw):
    kw.setdefault("script", "s.py")
    kw.setdefault("python", "/venv/bin/python")
    return RunOptions(**kw)


def test_hydra_argv_keeps_survivors_and_guards_every_rank(launchers):
    argv = build_argv(launchers["hydra"], "/venv/bin/mpiexec",
                      _opts(nprocs=3, args=["a b", "$x", "--flag"], launcher_args=["-v"]),
                      {}, MPICH)
    assert argv == ["/venv/bin/mpiexec", "-disable-auto-cleanup", "-v", "-n", "3",
                    "/venv/bin/python", "-m", "mpimap", "--guard", "s.py", "a b", "$x", "--flag"]


def test_srun_argv_uses_the_librarys_pmi_and_every_task_by_default(launchers):
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4"}
    argv = build_argv(launchers["srun"], "/usr/bin/srun", _opts(), env, MPICH)
    assert argv == ["/usr/bin/srun", "--mpi=pmi2", "--kill-on-bad-exit=0", "--cpus-per-task=4",
                    "/venv/bin/python", "-m", "mpimap", "s.py"]
    argv = build_argv(launchers["srun"], "srun", _opts(nprocs=2, launcher_args=["-c", "2"]),
                      env, OMPI)
    assert argv[:3] == ["srun", "--mpi=pmix", "--kill-on-bad-exit=0"]
    assert "--cpus-per-task=4" not in argv          # the user's -c wins
    assert argv[3:7] == ["-c", "2", "-n", "2"]


def test_open_mpi_argv_recovers_and_records_rank0_status(launchers):
    argv = build_argv(launchers["openmpi"], "/usr/bin/mpirun", _opts(nprocs=2), {}, OMPI,
                      status_file="/tmp/st")
    assert argv == ["/usr/bin/mpirun", "--enable-recovery", "-n", "2", "/venv/bin/python", "-m",
                    "mpimap._rankexit", "/tmp/st", "/venv/bin/python", "-m", "mpimap", "s.py"]


def test_rank_count_is_required_outside_slurm_and_positive(launchers):
    with pytest.raises(LaunchError, match="-n N"):
        build_argv(launchers["hydra"], "mpiexec", _opts(), {}, MPICH)
    with pytest.raises(LaunchError, match="at least 1"):
        build_argv(launchers["hydra"], "mpiexec", _opts(nprocs=0), {}, MPICH)


@pytest.mark.parametrize("launcher_code,rank0,expected", [
    (0, 0, 0), (0, 7, 7), (0, 1, 1), (3, 0, 3), (-9, None, 137), (0, None, 1), (5, None, 5),
])
def test_final_status_prefers_rank0(launcher_code, rank0, expected):
    assert _launch._final_status(launcher_code, rank0) == expected


# -- finding the program -------------------------------------------------------------------------

def _fake_program(folder: Path, name: str, version_text: str) -> Path:
    """An executable that answers --version like some launcher (only identify() runs it)."""
    path = folder / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{version_text}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_an_mpiexec_from_another_mpi_is_refused_with_the_fix(launchers, tmp_path):
    wrong = _fake_program(tmp_path, "mpiexec", "mpiexec (OpenRTE) 4.1.4")
    with pytest.raises(LaunchError) as info:
        _launch.find_program(launchers["hydra"], "/nowhere/python", MPICH, {"PATH": ""},
                             explicit=str(wrong))
    text = str(info.value)
    assert str(wrong) in text and "OpenRTE" in text and "--mpiexec" in text


def test_the_matching_mpiexec_is_found_past_a_wrong_one(launchers, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _fake_program(tmp_path / "a", "mpiexec", "mpiexec (OpenRTE) 4.1.4")
    right = _fake_program(tmp_path / "b", "mpiexec", "HYDRA build details:\n    Version: 4.2")
    path = f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"
    found = _launch.find_program(launchers["hydra"], "/nowhere/python", MPICH, {"PATH": path})
    assert found == str(right)


def test_no_mpiexec_at_all_says_how_to_get_one(launchers):
    with pytest.raises(LaunchError, match="pip install mpich"):
        _launch.find_program(launchers["hydra"], "/nowhere/python", Library("mpich", "x"),
                             {"PATH": ""})


def test_srun_must_be_on_path_inside_an_allocation(launchers):
    with pytest.raises(LaunchError, match="no srun on PATH"):
        _launch.find_program(launchers["srun"], sys.executable, MPICH,
                             {"PATH": "", "SLURM_JOB_ID": "5"})


# -- the one _call() -----------------------------------------------------------------------------

def test_call_returns_output():
    proc = _call([sys.executable, "-c", "print('hello')"])
    assert proc.stdout == "hello\n" and proc.returncode == 0


def test_call_reports_command_exit_code_stdout_and_stderr():
    with pytest.raises(CommandError) as info:
        _call(["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
    exc = info.value
    assert exc.returncode == 3 and exc.stdout == "to-out\n" and exc.stderr == "to-err\n"
    text = str(exc)
    for piece in ("exit code 3", "sh -c", "to-out", "to-err", "stdout", "stderr"):
        assert piece in text


def test_call_reports_a_missing_program_and_a_timeout():
    with pytest.raises(CommandError, match="no such program"):
        _call(["mpimap-no-such-program-xyz"])
    with pytest.raises(CommandError, match="did not finish within 0.3 s"):
        _call(["sleep", "5"], timeout=0.3)


def test_detect_library_of_this_python():
    lib = _launch.detect_library(sys.executable)
    assert lib.family in ("mpich", "openmpi")
    assert lib.version and os.path.basename(lib.path).startswith("libmpi")


def test_detect_library_failure_says_what_to_install(tmp_path):
    broken = _fake_program(tmp_path, "python", "no mpi4py here")
    (tmp_path / "python").write_text("#!/bin/sh\necho 'No module named mpi4py' >&2\nexit 1\n")
    with pytest.raises(LaunchError, match="pip install mpich"):
        _launch.detect_library(str(broken))


# -- launcher / MPI mismatch in `python -m mpimap` -------------------------------------------------

@pytest.mark.parametrize("environ,size,needle", [
    ({"SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0"}, 1, "--mpi=pmi2"),
    ({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"}, 1, "Open MPI's mpirun"),
    ({"PMI_SIZE": "4", "PMI_RANK": "0", "PMI_FD": "5"}, 1, "another MPI"),
    ({"PMI_SIZE": "4", "PMI_RANK": "0"}, 2, "world of 2"),
])
def test_launch_mismatch_is_explained(environ, size, needle):
    text = _env.launch_mismatch(environ, size, "Some MPI 1.0")
    assert text is not None and needle in text


@pytest.mark.parametrize("environ,size", [
    ({}, 1),                                                        # plain python script.py
    ({"PMI_SIZE": "3", "PMI_RANK": "2", "PMI_FD": "4"}, 3),         # hydra, right library
    ({"SLURM_STEP_NUM_TASKS": "3", "SLURM_PROCID": "0", "PMI_FD": "7"}, 3),   # srun pmi2
    ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0", "PMI_SIZE": "1"}, 1),  # hydra -n 1
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "4"}, 1),     # batch script
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, 1),       # srun -n 1
])
def test_no_false_alarm(environ, size):
    assert _env.launch_mismatch(environ, size, "x") is None


def test_launcher_library_mismatch_before_mpi_starts():
    assert "MPICH's own mpiexec" in _env.launcher_library_mismatch(
        {"OMPI_COMM_WORLD_SIZE": "2"}, "mpich")
    assert "srun --mpi=pmi2" in _env.launcher_library_mismatch(
        {"PMI_FD": "3", "SLURM_STEP_ID": "0", "OMPI_ALLOW_RUN_AS_ROOT": "1"}, "openmpi")
    assert _env.launcher_library_mismatch({"PMI_FD": "3", "PMIX_RANK": "0"}, "openmpi") is None
    assert _env.launcher_library_mismatch({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi") is None
    assert _env.launcher_library_mismatch({}, "mpich") is None


def test_launcher_knobs_are_checked():
    assert _env.knob("MPIMAP_LAUNCHER", {}) == "auto"
    assert _env.knob("MPIMAP_LAUNCHER", {"MPIMAP_LAUNCHER": "SRUN"}) == "srun"
    with pytest.raises(ValueError, match="MPIMAP_LAUNCHER"):
        _env.knob("MPIMAP_LAUNCHER", {"MPIMAP_LAUNCHER": "mpirun"})


# -- the command, end to end (dry runs: nothing is launched) ---------------------------------------

def _cli(*args, env=None, cwd=None):
    full = dict(os.environ)
    for var in [v for v in full if v.startswith(("SLURM_", "MPIMAP_"))]:
        del full[var]
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "mpimap.cli", *args], capture_output=True,
                          text=True, env=full, cwd=cwd, timeout=120)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("print('hi')\n")
    return path


def test_run_dry_run_outside_slurm_prints_the_matching_mpiexec(script):
    res = _cli("run", "-n", "3", "--dry-run", "--launcher-arg=-v", str(script), "a b",
               cwd=script.parent)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    lib = _launch.detect_library(sys.executable)
    if lib.family == "mpich":
        assert " -disable-auto-cleanup -v -n 3 " in line and " -m mpimap --guard " in line
    else:
        assert " --enable-recovery -v -n 3 " in line
    assert line.endswith(f"{script} 'a b'")


def test_run_dry_run_inside_an_allocation_prints_srun(script, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _fake_program(bindir, "srun", "slurm 22.05.8")   # only looked up on PATH, never run
    res = _cli("run", "--dry-run", str(script),
               env={"SLURM_JOB_ID": "42", "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{bindir}/srun --mpi=pmi2 --kill-on-bad-exit=0 ")
    assert " -n " not in res.stdout


def test_run_errors_name_the_fix(script, tmp_path):
    res = _cli("run", "--dry-run", str(script))
    assert res.returncode == 2 and "-n N" in res.stderr
    res = _cli("run", "-n", "2", str(tmp_path / "missing.py"))
    assert res.returncode == 2 and "cannot find the script" in res.stderr
    res = _cli("run", "-n", "2", "--dry-run", str(script), env={"MPIMAP_LAUNCHER": "bogus"})
    assert res.returncode != 0 and "MPIMAP_LAUNCHER" in res.stderr
