"""CPU seconds each rank burns while idle: workers between maps, rank 0 during a long task."""
import json
import os
import time

import mpimap


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nap(x):
    time.sleep(x)
    return os.getpid()


pids = sorted(set(mpimap.pmap(lambda x: os.getpid(), range(20), chunksize=1)))
before = {p: cpu_of(p) for p in pids}
time.sleep(2.0)  # rank 0 runs "serial code"; workers have nothing to do
idle = {p: cpu_of(p) - before[p] for p in pids}
me = cpu_of(os.getpid())
mpimap.pmap(nap, [2.0])  # rank 0 waits 2 s for one long task
waiting = cpu_of(os.getpid()) - me
print(json.dumps({"workers_idle": idle, "rank0_waiting": waiting}))
