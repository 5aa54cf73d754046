"""Fit the polynomial of npsam's float32 GELU (npsam/fast/ops.py: _GELU_P).

    python scripts/fit_gelu.py          # prints the coefficients and the fit's error

gelu(x) = x * Phi(x) = x * sigmoid(z(x)),  z(x) = logit(Phi(x)) = log(Phi(x) / Phi(-x)).
z is odd and smooth, so z(x) = x * P(x^2). P (degree 6 in u = x^2, on u <= 36) is
fitted by Lawson's iteratively reweighted least squares towards the minimax of
the error it causes in gelu, measured in units of the input's ulp:

    d gelu = x * s (1 - s) * d z = x^2 * s (1 - s) * d P,   ulp(x) ~ x * 2^-23

so the weight is x * s (1 - s), s = Phi(x). Only NumPy and math are needed;
Phi comes from math.erfc in float64.
"""

from __future__ import annotations

import math

import numpy as np

DEGREE = 6
U_MAX = 36.0  # fit on |x| <= 6; beyond, z grows linearly in x and the sigmoid saturates


def fit(degree: int = DEGREE, u_max: float = U_MAX, points: int = 20000, iterations: int = 300):
    x = np.linspace(1e-4, math.sqrt(u_max), points)
    erfc = np.frompyfunc(math.erfc, 1, 1)
    phi_pos = (erfc(-x / math.sqrt(2)) / 2).astype(np.float64)  # Phi(x)
    phi_neg = (erfc(x / math.sqrt(2)) / 2).astype(np.float64)  # Phi(-x)
    target = np.log(phi_pos / phi_neg) / x  # P(x^2) = z(x) / x
    weight = phi_pos * phi_neg * x
    basis = np.vander(x * x / u_max, degree + 1, increasing=True)  # scaled for conditioning
    lawson = np.ones_like(x)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(basis * (weight * lawson)[:, None], target * weight * lawson, rcond=None)
        err = np.abs(basis @ coef - target) * weight
        lawson *= np.sqrt(err / err.max())
        lawson = lawson / lawson.max() + 1e-12
    err = np.abs(basis @ coef - target) * weight
    coef = coef / u_max ** np.arange(degree + 1)  # back to powers of u
    return coef[::-1], float(err.max() * 2.0 ** 23)  # highest degree first; error in ~ulps of x


def main() -> None:
    coef, err = fit()
    print(f"P(u), degree {DEGREE} on u <= {U_MAX}, highest first (weighted error ~{err:.3f} ulp of x):")
    print("_GELU_P = (" + ", ".join(repr(float(c)) for c in coef) + ")")


if __name__ == "__main__":
    main()
