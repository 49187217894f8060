"""One spectral core: every method is a scalar function F applied to the eigenvalue grid Λ."""
