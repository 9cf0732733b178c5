"""emcee with mpimap.Pool: the log-probability is evaluated on the workers.

    pip install emcee
    mpimap run -n 3 examples/emcee_pool.py
"""
import numpy as np

import mpimap

try:
    import emcee
except ImportError:  # pragma: no cover
    raise SystemExit("this example needs emcee: pip install emcee") from None

rng = np.random.default_rng(0)
true_mu = np.array([1.0, -2.0, 0.5])
data = true_mu + rng.normal(size=(500, 3))  # captured by log_prob: sent once, not per step


def log_prob(theta):
    return -0.5 * np.sum((data - theta) ** 2)


if __name__ == "__main__":
    nwalkers, ndim = 16, 3
    p0 = rng.normal(size=(nwalkers, ndim))
    np.random.seed(1)  # emcee draws its moves from numpy's global RandomState
    with mpimap.Pool() as pool:
        sampler = emcee.EnsembleSampler(nwalkers, ndim, log_prob, pool=pool)
        sampler.run_mcmc(p0, 300, progress=False)
    mean = sampler.get_chain(discard=100, flat=True).mean(axis=0)
    print("posterior mean", np.round(mean, 6), "true", true_mu)
