#!/bin/bash
# Rendered by `mpimap sbatch` (mpimap X.Y.Z).
#SBATCH --job-name=run
#SBATCH --output=run-%j.out

set -e

# exec: this shell becomes the launcher, so scancel's SIGTERM and the warning signal reach it and
# it passes them on to the ranks. (Run as a plain child, python would be left running when
# scancel kills this shell.) `mpimap run` picks srun --mpi=<the PMI of mpi4py's MPI library>,
# or that library's own mpiexec with --launcher mpiexec, and uses every task of the job.
exec /opt/py/bin/python -m mpimap.cli run --launcher srun -- /home/user/project/run.py
