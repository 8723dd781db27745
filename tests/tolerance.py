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

How the suite uses them: a check of a formula runs in float64 where the code allows it (the
bound is then ~1e-12, far below any wrong constant, axis or missing term), and float32 is held to
its own bound against float64; two float32 paths of one formula each lie within the bound of the
exact value, so they agree within twice it; a negative check (``not allclose``) asks for a gap
orders of magnitude above the bound. A whole training trajectory has no such bound (how far one
step's rounding moves the next depends on the loss surface, not the dtype): compare one step at
a time from the same weights and optimizer state instead (tests/dist_train/
test_compile_channels_last.py), or say that the tolerance is measured (test_deepspeed.py).
"""
from __future__ import annotations

import math

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


# An elementary function (exp, log, cos, erf, tanh, pow) costs more than one rounding: ATen's
# vectorised float kernels call SLEEF's u10 / u35 variants (<= 1.0 / 3.5 ulp, 1 ulp <= 2u) or
# its own polynomials of the same accuracy, scalar fallbacks libm (<= 1 ulp). 3.5 ulp <= 7 u,
# plus the rounding of the result: 8 unit roundoffs, counted as 8 operations in a gamma chain.
ELEMENTARY_OPS = 8


def ops_rtol(n_ops: int, n_elementary: int = 0, dtype: torch.dtype = torch.float32) -> float:
    """Relative error bound of a chain of ``n_ops`` rounded ``+ - * / sqrt`` on values with no
    cancellation (products, quotients, sums of same-signed terms), with ``n_elementary``
    elementary functions among them: ``gamma(n_ops + ELEMENTARY_OPS * n_elementary)``
    (Lemma 3.1; a well-conditioned function passes its argument's relative error through
    with a factor <= 1, which the chain length absorbs)."""
    return gamma(max(n_ops + ELEMENTARY_OPS * n_elementary, 1), dtype)


def dot_atol(k: int, abs_dot: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of an inner product of length ``k`` (a matmul entry, a linear or
    convolution output with ``k = fan-in``), in any order, with or without FMA:
    ``gamma(k) * sum |a_i b_i|`` (Higham eq. 3.5); ``abs_dot`` is that sum of |terms|
    (for unit vectors <= 1 by Cauchy-Schwarz)."""
    return gamma(max(k, 1), dtype) * abs_dot


def cosine_atol(d: int, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of a cosine similarity of two ``d``-vectors, computed either way
    (``a.b / (|a| |b|)`` or normalise-then-dot): the dot errs by ``gamma(d) |a||b|``
    (Cauchy-Schwarz), each squared norm by ``gamma(d)`` relative, the square roots halve that
    and add one rounding each, the division or the two normalisations add <= 4 roundings:
    ``gamma(2 d + 8)`` on a value of modulus <= 1."""
    return gamma(2 * d + 8, dtype)


def softmax_atol(n: int, logit_range: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of each probability of a softmax over ``n`` logits spanning
    ``logit_range`` (max - min), and of the sum of all ``n`` probabilities less 1.

    ``p_i = exp(z_i - m) / sum_j exp(z_j - m)``: the subtraction errs by ``u |z_i - m| <= u R``
    absolute, which exp turns into the same relative error, exp itself adds ELEMENTARY_OPS
    roundings; the sum of ``n`` positive terms adds ``gamma(n - 1)`` relative, the division one
    rounding. Numerator and denominator each carry the exp error, so ``p_i`` (<= 1) errs by
    <= ``2 u R + gamma(n + 2 ELEMENTARY_OPS + 1)``; the probabilities' sum (n terms, <= 1)
    adds ``gamma(n - 1)``.
    """
    per_prob = 2 * unit_roundoff(dtype) * logit_range + gamma(n + 2 * ELEMENTARY_OPS + 1, dtype)
    return per_prob + gamma(max(n - 1, 1), dtype)


def logsumexp_atol(n: int, max_abs_logit: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of a cross-entropy / log-sum-exp over ``n`` logits with
    ``|z| <= max_abs_logit``, ``lse - z_y`` with ``lse = m + log sum exp(z - m)``: the shifted
    sum ``S`` in ``[1, n]`` errs by ``2 u max|z| + gamma(n + ELEMENTARY_OPS)`` relative (as in
    ``softmax_atol``), log turns that into the same absolute error and adds ELEMENTARY_OPS
    roundings of ``log n``; adding ``m`` and subtracting ``z_y`` round values
    <= ``2 max|z| + log n`` once each."""
    u, s = unit_roundoff(dtype), max_abs_logit
    log_n = math.log(max(n, 1))
    shifted_sum = 2 * u * s + gamma(n + ELEMENTARY_OPS, dtype)
    return shifted_sum + gamma(ELEMENTARY_OPS, dtype) * log_n + 2 * u * (2 * s + log_n)


def rollout_atol(n_tokens: int, layers: int, heads: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of an attention rollout entry (Abnar & Zuidema: per layer
    ``S = row-normalised(0.5 A + 0.5 I)``, the product ``S_L ... S_1``) over ``n_tokens``
    tokens and ``layers`` layers, with the attention averaged over ``heads`` heads first.
    Every matrix is row-stochastic, so every entry and every row sum of |terms| is <= 1: the
    head mean errs by ``gamma(heads)``, ``0.5 A + 0.5 I`` by one rounding, the row sum and
    division by ``gamma(n)``, each product entry (an inner product of length ``n`` of terms
    summing to <= 1) by ``gamma(n)``; products of stochastic matrices carry earlier errors
    with gain 1 (infinity norm), so the layers' errors add; the final row re-normalisation
    adds ``gamma(n + 1)``."""
    return gamma(heads + layers * (2 * n_tokens + 2) + n_tokens + 1, dtype)


def network_atol(reductions: list[int], scale: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of a network path (layers in sequence, each one reduction of
    length ``k_i`` (a linear/conv fan-in, attention's head dimension or token count, a
    normalisation's width) followed by element-wise work) against the same formula in exact
    arithmetic, hence between two kernel choices or against float64 (then twice this, or
    once plus the float64 bound).

    Each reduction errs by <= ``gamma(k_i)`` times its sum of |terms| (``dot_atol``); the
    element-wise work around it (normalisation, activation, softmax, residual add) adds a few
    roundings and an elementary function, counted as ``2 + ELEMENTARY_OPS`` per layer. To
    first order the errors add as they travel through the later layers. ``scale`` bounds each
    layer's sum of |terms| as it reaches the output, i.e. the magnitudes the path carries
    times the gain of what follows; with weights at initialisation scale (timm: std 0.02, row
    sums of |W| x well inside the activations they feed, normalisations re-scaling to
    O(1)) the largest activation of the exact (float64) path is that bound, so the callers
    pass the float64 reference's largest |value| (a property of the formula, not of a run).
    """
    ops = sum(reductions) + (2 + ELEMENTARY_OPS) * len(reductions)
    return gamma(ops, dtype) * scale


def _to_double(obj):
    if torch.is_tensor(obj):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_double(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    return obj


def _reduction(module: torch.nn.Module, inputs: tuple) -> int | None:
    """The reduction length one leaf layer rounds (fan-in, or a normalisation's width)."""
    nn = torch.nn
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups * math.prod(module.kernel_size)
    if isinstance(module, nn.LayerNorm):
        return 2 * math.prod(module.normalized_shape)
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) and inputs and torch.is_tensor(inputs[0]):
        x = inputs[0]
        return 2 * max(x.numel() // max(x.shape[1], 1), 1)     # statistics over batch x space (train mode)
    return None


def module_atol(module: torch.nn.Module, *inputs, dtype: torch.dtype = torch.float32,
                extra_reductions: tuple[int, ...] = (), **kwargs) -> float:
    """``network_atol`` of a whole module on given inputs, read off a float64 copy: every leaf
    Linear / Conv / normalisation that runs adds its reduction (all of them, in call order: a
    U-Net's skip paths make the chain longer than any one path, so this over-counts), and the
    scale is the largest |input or output| any leaf sees in the exact (float64) forward.
    ``extra_reductions``: reductions done by plain tensor code (a global mean pool over H*W)."""
    import copy

    model = copy.deepcopy(module).double()
    reductions: list[int] = []
    largest = [0.0]

    def seen(m: torch.nn.Module, args: tuple, out) -> None:
        k = _reduction(m, args)
        if k is not None:
            reductions.append(k)
        for t in list(args) + [out]:
            if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                largest.append(float(t.detach().abs().amax()))

    hooks = [m.register_forward_hook(seen) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(*_to_double(inputs), **_to_double(kwargs))
    finally:
        for h in hooks:
            h.remove()
    return network_atol(reductions + list(extra_reductions) or [1], max(largest), dtype)


def embedding_cosine_atol(embedding_atol: float, d: int, min_norm: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute error bound of the cosine of two ``d``-dimensional embeddings whose components
    each err by <= ``embedding_atol`` (e.g. ``module_atol``) and whose norms are >= ``min_norm``:
    normalising turns an error vector of norm <= sqrt(d) * embedding_atol into one of norm
    <= 2 sqrt(d) embedding_atol / |e|, and the cosine of unit vectors moves by at most the sum of
    the two such errors (Cauchy-Schwarz); the cosine's own rounding adds ``cosine_atol(d)``."""
    return 4 * math.sqrt(d) * embedding_atol / min_norm + cosine_atol(d, dtype)
