#!/bin/bash
# Rendered by `mpimap sbatch` (mpimap X.Y.Z).
#SBATCH --job-name=run
#SBATCH --ntasks=3
#SBATCH --time=30
#SBATCH --output=run-%j.out
#SBATCH --signal=B:INT@300

set -e
module load miniconda3
eval "$(conda shell.bash hook)"
conda activate science

# exec: this shell becomes the launcher, so scancel's SIGTERM and the warning signal reach it and
# it passes them on to the ranks. (Run as a plain child, python would be left running when
# scancel kills this shell.) `mpimap run` picks srun --mpi=<the PMI of mpi4py's MPI library>,
# or that library's own mpiexec with --launcher mpiexec, and uses every task of the job.
exec /opt/py/bin/python -m mpimap.cli run --launcher hydra -- /home/user/project/run.py
