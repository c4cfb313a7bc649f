"""The AVX512-BF16 filter GEMM (csrc/cpu/gemm_bf16.{h,cpp}), through ``pdepth._C._gemm_bf16``.

The numerical contract of gemm_bf16.h is checked bit for bit against a numpy emulation of the
exact chain (bfloat16 denormal inputs read as zero; exact products; per pair, the odd element
added first, then the even one, each step rounded to float32 to nearest even and flushed to zero
below 2^-126), and against the error bound gamma_k * sum|a_d b_d| + k * 2^-125 that the k-NN
filter margin is derived from. Skipped where the extension lacks the op or the CPU lacks
AVX512-BF16. No wall-clock assertions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pdepth

MIN_NORMAL = 2.0**-126
U = 2.0**-24


def _ops():
    c_ext = getattr(pdepth, "_C", None)
    if c_ext is None or not hasattr(c_ext, "_gemm_bf16") or not hasattr(c_ext, "_cpu_features"):
        pytest.skip("pdepth._C has no _gemm_bf16 / _cpu_features")
    features = c_ext._cpu_features()
    if not features.get("avx512_bf16", False):
        pytest.skip("this CPU has no usable AVX512-BF16")
    return c_ext


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _ops()._gemm_bf16(a, b)


# ---------------------------------------------------------------------------------------------
# Reference: the exact chain of gemm_bf16.h, emulated with float64 (exact for one step: an
# accumulator (24 bits) plus a product (16 bits), or else the smaller term is far below half an
# ulp of the larger) rounded once to float32.


def _bf16_to_f64_daz(x: torch.Tensor) -> np.ndarray:
    """bfloat16 tensor -> float64 array, denormals (exponent field 0) read as signed zero."""
    u = x.contiguous().view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    denormal = (u & 0x7F80) == 0
    u = np.where(denormal, u & 0x8000, u).astype(np.uint32)
    return (u << 16).view(np.float32).astype(np.float64)


def _round_ftz(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 round to nearest even with a 24-bit significand and unbounded exponent,
    then a magnitude below 2^-126 flushed to a signed zero (tininess after rounding)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = x.astype(np.float32)
    small = np.abs(x) < MIN_NORMAL
    if small.any():
        # round at 24 bits in the normal range (exact scaling), then flush what stays tiny
        y = (x[small] * 2.0**64).astype(np.float32)
        kept = np.abs(y) >= np.float32(2.0**-62)
        r[small] = np.where(kept, np.copysign(np.float32(MIN_NORMAL), y), np.copysign(np.float32(0), y))
    return r


def _emulate(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """c[i, j] by the chain: pairs q = 0, 1, ...; s = fl(s + p_{2q+1}); s = fl(s + p_{2q})."""
    A, B = _bf16_to_f64_daz(a), _bf16_to_f64_daz(b)
    m, k = A.shape
    n = B.shape[0]
    s = np.zeros((m, n), np.float32)
    for q in range((k + 1) // 2):
        for d in (2 * q + 1, 2 * q):
            if d >= k:
                continue  # the zero pad: adding +0 to a normal or zero s changes no value
            s = _round_ftz(s.astype(np.float64) + np.outer(A[:, d], B[:, d]))
    return s


def _same(c: torch.Tensor, e: np.ndarray) -> bool:
    """Bit-identical, except that +0 and -0 are not told apart (the zero pad may turn -0 into +0)."""
    cv = c.numpy()
    return bool(np.array_equal(cv, e, equal_nan=True))


def _bf16(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float32)).to(torch.bfloat16)


def _wide(gen: torch.Generator, shape, lo: int, hi: int, zero_frac: float = 0.0) -> torch.Tensor:
    """bfloat16 values with random signs, significands and exponents in [lo, hi)."""
    mant = 1 + torch.rand(shape, generator=gen, dtype=torch.float64)
    expo = torch.randint(lo, hi, shape, generator=gen).to(torch.float64)
    sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
    x = sign * mant * torch.exp2(expo)
    if zero_frac:
        x = torch.where(torch.rand(shape, generator=gen) < zero_frac, torch.zeros_like(x), x)
    return x.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The hardware's step semantics, on crafted pairs (clear messages if another CPU differs).


def test_pair_order_odd_element_first():
    # pair 0 sets s = -1 (p1 = -1, p0 = 0); pair 1: p3 = 2^-30, p2 = 1
    a = _bf16([[0.0, -1.0, 1.0, 2.0**-30]])
    b = _bf16([[1.0, 1.0, 1.0, 1.0]])
    # odd first: fl(-1 + 2^-30) = -1, then -1 + 1 = 0 (even first would give 2^-30)
    assert _gemm(a, b).item() == 0.0
    a = _bf16([[0.0, -1.0, 2.0**-30, 1.0]])
    assert _gemm(a, b).item() == 2.0**-30


def test_each_step_rounds_to_float32():
    # 1 + 2^-24 + 2^-24: each step a tie to even -> 1 (one rounding of the pair sum: 1 + 2^-23)
    a = _bf16([[1.0, 0.0, 2.0**-24, 2.0**-24]])
    b = _bf16([[1.0, 1.0, 1.0, 1.0]])
    assert _gemm(a, b).item() == 1.0


def test_products_exact_and_flush_to_zero():
    # a product below 2^-126 is not flushed by itself: odd element first, 0 + 2^-126 = 2^-126,
    # then + 2^-65 * 2^-65 = 2^-130
    a = _bf16([[2.0**-65, 2.0**-126]])
    b = _bf16([[2.0**-65, 1.0]])
    assert _gemm(a, b).item() == np.float32(2.0**-126 + 2.0**-130)
    # a result below 2^-126 is flushed to zero
    assert _gemm(_bf16([[2.0**-65, 0.0]]), _bf16([[2.0**-65, 0.0]])).item() == 0.0
    # a bfloat16 denormal input is read as zero, even against a large factor
    den = torch.tensor([[0x0008, 0]], dtype=torch.int16).view(torch.bfloat16)  # 2^-130
    assert _gemm(den, _bf16([[2.0**100, 0.0]])).item() == 0.0
    # products are not rounded to float32 range: p1 = -2^200 makes s = -inf, + 2^200 stays -inf
    a = _bf16([[2.0**100, 2.0**100]])
    b = _bf16([[2.0**100, -(2.0**100)]])
    assert _gemm(a, b).item() == -math.inf
    assert _same(_gemm(a, b), _emulate(a, b))


def test_tininess_after_rounding_at_24_bits():
    # pair 0: p1 = 2^-126 first, then p0 = 2^-75 * 2^-74: s = 2^-126 + 2^-149 (exact)
    # pair 1: p3 = -1.375 * 2^-149: s + p3 = 2^-126 - 3 * 2^-152, which rounds (24-bit
    # significand) to 2^-126 - 2^-150, tiny -> flushed to 0. (Rounding at denormal precision,
    # before the flush, would give 2^-126.)
    a = _bf16([[2.0**-75, 2.0**-126, 0.0, -1.375 * 2.0**-75]])
    b = _bf16([[2.0**-74, 1.0, 0.0, 2.0**-74]])
    assert _gemm(a, b).item() == 0.0
    assert _same(_gemm(a, b), _emulate(a, b))


# ---------------------------------------------------------------------------------------------
# Bit-identical to the emulation on edge shapes: k = 1, odd k, n not a multiple of 16 or 32,
# m not a multiple of the register tile (14) or the row block (112), k across the k blocks
# (256 pairs).

SHAPES = [
    (1, 1, 1), (1, 1, 2), (2, 3, 1), (3, 5, 7), (1, 17, 3), (13, 15, 16), (14, 16, 31),
    (15, 31, 32), (29, 33, 63), (16, 47, 64), (31, 64, 65), (113, 65, 100), (57, 100, 511),
    (28, 40, 512), (15, 33, 513), (9, 70, 1025), (120, 31, 1100), (250, 48, 37),
]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_bit_identical_to_emulation(m, n, k):
    gen = torch.Generator().manual_seed(1000 * m + 10 * n + k)
    a = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    assert _same(_gemm(a, b), _emulate(a, b))


@pytest.mark.parametrize("m,n,k", [(5, 37, 33), (30, 20, 700), (17, 50, 9)])
def test_bit_identical_wide_exponents(m, n, k):
    """Values over 2^-100..2^40 with zeros, bfloat16 denormals and tiny products (flushes):
    heavy cancellation and absorption, every rounding in the chain matters."""
    gen = torch.Generator().manual_seed(7 * m + n + k)
    a = _wide(gen, (m, k), -100, 40, zero_frac=0.1)
    b = _wide(gen, (n, k), -60, 20, zero_frac=0.1)
    # a few bfloat16 denormals (exponent field 0) in both operands
    ai = a.view(torch.int16).clone()
    ai[:, ::7] = torch.randint(1, 0x7F, (m, len(range(0, k, 7))), generator=gen, dtype=torch.int16)
    a = ai.view(torch.bfloat16)
    bi = b.view(torch.int16).clone()
    bi[::3, 1::5] = torch.randint(1, 0x7F, bi[::3, 1::5].shape, generator=gen, dtype=torch.int16)
    b = bi.view(torch.bfloat16)
    c = _gemm(a, b)
    assert _same(c, _emulate(a, b))


def test_same_bits_whatever_the_thread_count(restore_num_threads):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(300, 777, generator=gen).to(torch.bfloat16)
    b = torch.randn(70, 777, generator=gen).to(torch.bfloat16)
    torch.set_num_threads(1)
    c1 = _gemm(a, b)
    torch.set_num_threads(max(2, restore_num_threads))
    c2 = _gemm(a, b)
    assert torch.equal(c1.view(torch.int32), c2.view(torch.int32))
    # a row's result does not depend on which other rows are in the call
    c3 = _gemm(a[123:130], b)
    assert torch.equal(c1[123:130].view(torch.int32), c3.view(torch.int32))
    # nor a column's on the other columns
    c4 = _gemm(a, b[33:35])
    assert torch.equal(c1[:, 33:35].view(torch.int32), c4.view(torch.int32))


# ---------------------------------------------------------------------------------------------
# The error bound |c - E| <= gamma_k * S + k * 2^-125 (S = sum |a_d b_d| of the DAZ'd inputs,
# E their exact sum), up to k = 50176, on adversarial values.


def _exact(A: np.ndarray, B: np.ndarray):
    """Exact sums (math.fsum of exact float64 products) and sum |p|, per (i, j)."""
    m, n = A.shape[0], B.shape[0]
    E = np.empty((m, n))
    S = np.empty((m, n))
    for i in range(m):
        P = A[i][None, :] * B  # exact: bfloat16 products fit float64
        for j in range(n):
            E[i, j] = math.fsum(P[j])
        S[i] = np.abs(P).sum(axis=1)
    return E, S


def _check_bound(a: torch.Tensor, b: torch.Tensor):
    k = a.shape[1]
    c = _gemm(a, b).numpy().astype(np.float64)
    A, B = _bf16_to_f64_daz(a), _bf16_to_f64_daz(b)
    E, S = _exact(A, B)
    gamma = k * U / (1 - k * U)
    # S from a float64 sum: relative error < k 2^-53, covered by the factor below
    bound = gamma * S * (1 + 2.0**-20) + k * 2.0**-125
    assert np.isfinite(c).all()
    err = np.abs(c - E)
    assert (err <= bound).all(), f"max err/bound {np.max(err / bound)}"
    return err, bound


@pytest.mark.parametrize("k", [1, 2, 3, 784, 4097, 16384, 50176])
def test_error_bound_random(k):
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(3, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(35, k, generator=gen).to(torch.bfloat16)
    _check_bound(a, b)


@pytest.mark.parametrize("k", [64, 4096, 50176])
def test_error_bound_adversarial(k):
    """Absorption (a large first term, many small ones lost, the large one cancelled), mixed
    magnitudes up to 2^45 * 2^20, tiny products that get flushed, bfloat16 denormals, zeros."""
    gen = torch.Generator().manual_seed(11 * k)
    rows = []
    # absorption: order is 1, 0, 3, 2, ...: +1 first, then 2^-25-ish terms, -1 last pair
    r = np.full(k, 2.0**-25 * 1.5, np.float32)
    r[1] = 1.0
    if k >= 4:
        r[k - 2 if k % 2 == 0 else k - 1] = -1.0
    rows.append(torch.as_tensor(r).to(torch.bfloat16))
    # wide exponents, cancellation
    rows.append(_wide(gen, (k,), -40, 45, zero_frac=0.05))
    rows.append(_wide(gen, (k,), -10, 10))
    # tiny: products around 2^-140, partial sums flushed
    rows.append(_wide(gen, (k,), -72, -68))
    # bfloat16 denormals mixed with normals
    d = _wide(gen, (k,), -5, 5).view(torch.int16).clone()
    d[::3] = torch.randint(1, 0x7F, d[::3].shape, generator=gen, dtype=torch.int16)
    rows.append(d.view(torch.bfloat16))
    a = torch.stack(rows)
    b = torch.cat([
        torch.ones(1, k, dtype=torch.bfloat16),
        _wide(gen, (1, k), -20, 20),
        _wide(gen, (1, k), -72, -68),
        -torch.ones(1, k, dtype=torch.bfloat16),
        torch.randn(17, k, generator=gen).to(torch.bfloat16),
    ])
    err, bound = _check_bound(a, b)
    # the absorption row does lose its small terms (the bound is not vacuous here)
    if k >= 4096:
        assert err[0, 0] > 0.25 * bound[0, 0] - k * 2.0**-125


def test_large_magnitudes_no_overflow():
    gen = torch.Generator().manual_seed(5)
    a = _wide(gen, (4, 100), 50, 56)
    b = _wide(gen, (9, 100), 50, 56)  # products < 2^112: no partial sum overflows
    c = _gemm(a, b)
    assert _same(c, _emulate(a, b))
    _check_bound(a, b)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, layouts.


def test_output_layout_and_dtype():
    a = torch.randn(37, 45).to(torch.bfloat16)
    b = torch.randn(19, 45).to(torch.bfloat16)
    c = _gemm(a, b)
    assert c.dtype == torch.float32 and c.device.type == "cpu"
    assert c.shape == (37, 19) and c.is_contiguous()
    # close to float64 (loose check; the exact checks are above)
    ref = a.double() @ b.double().t()
    assert torch.allclose(c.double(), ref, rtol=1e-4, atol=1e-4)


def test_non_contiguous_inputs():
    a = torch.randn(50, 40).to(torch.bfloat16)
    b = torch.randn(40, 33).to(torch.bfloat16)  # used as b.t(): [33, 40], not contiguous
    c = _gemm(a.t().contiguous().t(), b.t())
    assert torch.equal(c.view(torch.int32), _gemm(a, b.t().contiguous()).view(torch.int32))
    a2 = torch.randn(50, 80).to(torch.bfloat16)[:, ::2]
    assert torch.equal(_gemm(a2, b.t()).view(torch.int32),
                       _gemm(a2.contiguous(), b.t().contiguous()).view(torch.int32))


def test_empty_shapes():
    bf = torch.bfloat16
    assert _gemm(torch.zeros(0, 5, dtype=bf), torch.zeros(3, 5, dtype=bf)).shape == (0, 3)
    assert _gemm(torch.zeros(4, 5, dtype=bf), torch.zeros(0, 5, dtype=bf)).shape == (4, 0)
    c = _gemm(torch.zeros(4, 0, dtype=bf), torch.zeros(3, 0, dtype=bf))
    assert c.shape == (4, 3) and (c == 0).all()


def test_rejects_bad_arguments():
    bf = torch.bfloat16
    with pytest.raises(RuntimeError):
        _gemm(torch.zeros(2, 3), torch.zeros(2, 3))  # float32
    with pytest.raises(RuntimeError):
        _gemm(torch.zeros(2, 3, dtype=bf), torch.zeros(2, 4, dtype=bf))  # k mismatch
    with pytest.raises(RuntimeError):
        _gemm(torch.zeros(2, 3, 1, dtype=bf), torch.zeros(2, 3, dtype=bf))  # not 2-D


def test_cpu_features_dict():
    c_ext = getattr(pdepth, "_C", None)
    if c_ext is None or not hasattr(c_ext, "_cpu_features"):
        pytest.skip("pdepth._C has no _cpu_features")
    f = c_ext._cpu_features()
    assert set(f) >= {"avx512_bf16", "amx_bf16"}
    assert all(isinstance(v, bool) for v in f.values())
