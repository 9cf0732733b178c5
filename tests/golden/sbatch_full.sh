#!/bin/bash
# Rendered by `mpimap sbatch` (mpimap X.Y.Z).
#SBATCH --job-name=sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=32
#SBATCH --cpus-per-task=2
#SBATCH --time=01:30:00
#SBATCH --partition=compute
#SBATCH --account=proj-123
#SBATCH --mem=64G
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --chdir=/scratch/user/run1
#SBATCH --signal=USR1@120
#SBATCH --gres=gpu:1
#SBATCH --exclusive

set -e
module load gcc/12.2
module load openmpi/4.1
source /home/user/venv/bin/activate
export OMP_NUM_THREADS=2
export MY_DATA='/data/set 1'
ulimit -c 0

# exec: this shell becomes the launcher, so scancel's SIGTERM and the warning signal reach it and
# it passes them on to the ranks. (Run as a plain child, python would be left running when
# scancel kills this shell.) `mpimap run` picks srun --mpi=<the PMI of mpi4py's MPI library>,
# or that library's own mpiexec with --launcher mpiexec, and uses every task of the job.
exec /opt/py/bin/python -m mpimap.cli run --launcher srun --launcher-arg=--overlap -- /home/user/project/run.py --steps 100 'out dir/'
