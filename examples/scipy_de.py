"""scipy.optimize.differential_evolution with workers=pool.map.

    pip install scipy
    mpimap run -n 3 examples/scipy_de.py
"""
import numpy as np

import mpimap

try:
    from scipy.optimize import differential_evolution, rosen
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs scipy: pip install scipy") from None

if __name__ == "__main__":
    with mpimap.Pool() as pool:
        result = differential_evolution(rosen, [(-2, 2)] * 4, workers=pool.map,
                                        updating="deferred", seed=1, tol=1e-8)
    print("minimum at", np.round(result.x, 3), "f =", f"{result.fun:.2e}")
