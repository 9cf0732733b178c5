"""mpimap quickstart: a parameter scan that reads one big grid in every task.

    python examples/quickstart.py                 # serial, in-process
    mpimap run -n 3 examples/quickstart.py        # rank 0 drives, 2 ranks compute
    mpiexec -n 3 python -m mpimap examples/quickstart.py
"""
import time

import numpy as np

import mpimap

GRID = np.linspace(0.0, 1.0, 1_000_000)  # read by every task: sent once, as `common`


def simulate(params, grid):
    """One 'simulation': a damped oscillator sampled on the grid."""
    freq, damping = params
    noise = mpimap.rng().normal(scale=1e-3, size=8)  # reproducible per item, any rank count
    signal = np.exp(-damping * grid) * np.sin(2 * np.pi * freq * grid)
    return float(signal.mean() + noise.mean())


if __name__ == "__main__":
    params = [(float(f), float(d))
              for f in np.linspace(1, 5, 20) for d in np.linspace(0.1, 2.0, 10)]
    t0 = time.perf_counter()
    results = mpimap.pmap(simulate, params, common=GRID, seed=42, progress=True)
    best = max(range(len(params)), key=results.__getitem__)
    print(f"{len(results)} simulations in {time.perf_counter() - t0:.2f} s; "
          f"best parameters {params[best]} -> {results[best]:.5f}")
