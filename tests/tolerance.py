"""Float tolerances derived from the dtype and the size of the computation, not from one
machine's run: the reference and the code under test may use other kernels, another
reduction order or another precision (oneDNN / ATen pick kernels by CPU), so a tolerance
must hold for every order the hardware may choose.

The bounds are the classical worst-case ones (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed.): with unit roundoff ``u = eps / 2``, a product of ``n`` factors
``(1 + d_i)^(+-1)``, ``|d_i| <= u``, lies within ``gamma(n) = n u / (1 - n u)`` of 1
(Lemma 3.1), and any summation order of ``n`` terms errs by at most
``gamma(n - 1) * sum |x_i|`` (eq. 4.4). Bit-exact checks (resume, accumulation, rank
equality) compare the same kernels on the same inputs and do not use these.
"""
from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's gamma_n: the relative error bound of ``n`` rounded operations in a chain."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"{n} operations exhaust {dtype}'s precision"
    return nu / (1 - nu)


def sum_atol(n_terms: int, abs_sum: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of a sum of ``n_terms`` whose absolute values add up to
    ``abs_sum``, in any order (blocked, pairwise, SIMD lanes): ``gamma(n - 1) * sum |x_i|``,
    plus one rounding of the result."""
    return (gamma(max(n_terms - 1, 1), dtype) + unit_roundoff(dtype)) * abs_sum


def ssim_atol(win: int, data_range: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of one SSIM value (Wang et al. 2004, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2) computed with a separable ``win``-tap Gaussian in ``dtype``.

    Each local statistic (mu, E[x^2], E[xy]) is a positively weighted mean: two passes of
    ``win`` taps plus the window's own normalisation (``win`` more roundings) give an error
    <= gamma(3 win) * L^2. sigma^2 = E[x^2] - mu^2 and the covariance each carry <= 3 such
    errors (the mu^2 term doubles mu's), so the contrast-structure term
    (2 s_xy + C2) / (s_x^2 + s_y^2 + C2), whose denominator is >= C2, moves by at most
    2 * 6 gamma L^2 / C2 (numerator and denominator, |cs| <= 1). The luminance term has no
    cancellation (relative error <= 8 gamma) and the mean over positions adds one more
    rounding chain; on flat images the cancellation term dominates.
    """
    g = gamma(3 * win + 8, dtype)
    c2 = (0.03 * data_range) ** 2
    return 12 * g * data_range ** 2 / c2 + 8 * g
