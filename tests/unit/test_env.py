from __future__ import annotations

import pytest

from mpimap._env import KNOBS, knob, launched_world_size, worker_thread_env


def test_knob_defaults_and_parsing():
    assert knob("MPIMAP_MAX_MESSAGE", {}) == 1 << 30
    assert knob("MPIMAP_MAX_MESSAGE", {"MPIMAP_MAX_MESSAGE": "4k"}) == 4096
    assert knob("MPIMAP_LIFELINE", {"MPIMAP_LIFELINE": "off"}) is False


def test_bad_knob_names_itself_and_the_default():
    with pytest.raises(ValueError, match=r"MPIMAP_PREFETCH='zero'.*default 2"):
        knob("MPIMAP_PREFETCH", {"MPIMAP_PREFETCH": "zero"})


def test_every_knob_is_documented():
    for spec in KNOBS.values():
        assert spec.name.startswith("MPIMAP_") and spec.doc


def test_launcher_detection():
    assert launched_world_size({}) is None
    assert launched_world_size({"PMI_SIZE": "4", "PMI_RANK": "0"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    assert launched_world_size({"PMIX_RANK": "0"}) == 0
    # An sbatch script (batch step, no PMI) is not a parallel launch.
    assert launched_world_size({"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_ID": "batch"}) is None


def test_thread_caps_respect_the_users_choice():
    assert worker_thread_env({})["OMP_NUM_THREADS"] == "1"
    assert worker_thread_env({"OMP_NUM_THREADS": "4"}) == {}
    assert worker_thread_env({"MPIMAP_NO_THREAD_LIMITS": "1"}) == {}
