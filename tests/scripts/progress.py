import mpimap

print(sum(mpimap.pmap(abs, range(500), progress=True)))
