#!/bin/bash
# Rendered by `mpimap sbatch` (mpimap X.Y.Z).
#SBATCH --job-name="name with 100% $HOME 'q' \"dq\" back\\slash"
#SBATCH --output="/logs dir/%x %j 100%%.out"
#SBATCH --chdir="/scratch/it's \"here\" $HOME"

set -e
source '/home/user/my venv $1'/bin/activate
export QUOTED='it'"'"'s "x" $HOME `y` %j'

# exec: this shell becomes the launcher, so scancel's SIGTERM and the warning signal reach it and
# it passes them on to the ranks. (Run as a plain child, python would be left running when
# scancel kills this shell.) `mpimap run` picks srun --mpi=<the PMI of mpi4py's MPI library>,
# or that library's own mpiexec with --launcher mpiexec, and uses every task of the job.
exec /opt/py/bin/python -m mpimap.cli run --launcher srun -- '/home/user/my dir $x '"'"'q'"'"' "dq" 100%/run me.py' 'a b' 'it'"'"'s' 'say "hi"' '$HOME' '`date`' %j 100% 'back\slash' 'two
lines' --x '' '*' '; rm -rf /'
