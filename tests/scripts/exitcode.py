import sys

import mpimap

print(mpimap.pmap(abs, [-1, -2]))
sys.exit(int(sys.argv[1]))
