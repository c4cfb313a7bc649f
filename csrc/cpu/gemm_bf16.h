// Single-threaded bfloat16 x bfloat16 -> float32 GEMM for x86 CPUs with AVX512-BF16
// (VDPBF16PS, _mm512_dpbf16_ps): the filter GEMM of the k-NN op (Filter::kBf16).
//
// NUMERICAL CONTRACT (the filter margin is derived from it; tests/test_gemm_bf16.py checks it
// bit for bit against an emulation and against the bound below).
//
// Notation: a_d = a[i*lda + d], b_d = b[j*ldb + d], d < k, bfloat16; p_d = a_d * b_d.
// 1. Inputs: a bfloat16 denormal (nonzero, exponent field 0) is read as zero (DAZ).
// 2. Products: p_d is exact (8-bit x 8-bit significands; the exponent range is not
//    limited, so no product overflows, underflows or is flushed by itself).
// 3. Order: k is padded with one zero to an even length when odd (a zero product changes
//    nothing). With K2 = ceil(k/2) pairs, every output is ONE sequential chain of K2
//    VDPBF16PS steps, pair q = 0, 1, ..., K2-1 in order, starting from s = +0:
//        s = fl(s + p_{2q+1});  s = fl(s + p_{2q})        (the odd element of a pair first)
//    i.e. the summation order over d is 1, 0, 3, 2, 5, 4, ..., where fl(x) = x rounded to
//    float32, round-to-nearest-even, then flushed to a signed zero when its magnitude is below
//    2^-126 (FTZ); overflow gives +-inf. The running sum s is float32 throughout: the kernel
//    blocks k for the caches, but between blocks it stores s to c and reloads it (lossless),
//    so the chain is exactly the unblocked one. No bfloat16 intermediates, no FMA
//    contraction across steps, no reassociation. The result does not depend on m, n, the
//    position of the row/column in its block, blocking parameters or thread count.
// 4. Bound (k >= 1, no step overflows, k*2^-24 < 1/2): with S = sum_d |p_d| over the
//    products of the DAZ'd inputs and E = sum_d p_d their exact sum,
//        |c - E| <= gamma_k * S + k * 2^-125,       gamma_k = k u / (1 - k u),  u = 2^-24.
//    (Write each step as fl(x) = x (1 + e) + f with |e| <= u, and f = 0, or f = -x with
//    |x| < 2^-126 when flushed. At most k steps round (the zero pad of odd k adds +0 to a
//    normal or zero s: exact), so the products carry at most (1+u)^k - 1 <= gamma_k and the
//    flush errors sum to < k 2^-126 (1 + gamma_k) <= k 2^-125.) gamma_k <= gamma_{k+1}.
//    The relative term does not depend on the order or grouping of the roundings, so a CPU
//    that rounded a pair in one step would also meet it.
//    Relative to the un-DAZ'd inputs add sum_{d: a_d or b_d denormal} |a_d b_d| (a term can
//    be large when the other factor is: callers should avoid denormal bfloat16 inputs, e.g.
//    by flushing values below 2^-126 to zero before the bfloat16 conversion).
// 5. k == 0: c = 0. m == 0 or n == 0: nothing is written.
//
// Steps 1-3 are VDPBF16PS's per-lane semantics as measured on AMD EPYC (Zen, avx512_bf16)
// and as Intel's pseudocode documents them (odd pair element first; DAZ, FTZ, RNE implied,
// MXCSR ignored) with tininess detected after rounding to 24 bits (measured). tests/test_gemm_bf16.py
// checks them on the machine it runs on.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <vector>
namespace pdepth { namespace cpu {
// CPU features, detected once with CPUID + XGETBV (OS support of the zmm state; for AMX the tile state):
bool has_avx512_bf16();   // avx512f + avx512bw + avx512vl + avx512_bf16, usable
bool has_amx_bf16();      // amx_tile + amx_bf16 (detection only; no AMX code here)
// B operand of C = A B^T packed once for many A blocks: rows b[j*ldb + d], j < n, d < k.
// Layout: panels of 32 columns (n zero padded to a multiple of 32); panel P holds, for pair
// q = 0..ceil(k/2)-1, 32 dwords (b[j][2q] low half, b[j][2q+1] high half; zero past k or n),
// i.e. data[(P * ceil(k/2) + q) * 64 + 2 * (j - 32 P) + {0,1}].
struct PackedB {
  int64_t n = 0, k = 0;     // logical shape
  std::vector<uint16_t> data;  // kernel layout (VNNI pairs, zero padded), your choice
};
// pack_b splits large packs over 32-column panels with at::parallel_for (which runs inline
// inside an outer parallel region). Reusing one PackedB keeps the vector's capacity.
void pack_b(const at::BFloat16* b, int64_t ldb, int64_t n, int64_t k, PackedB& out);
// c[i*ldc + j] = sum_d a[i*lda + d] * b[j*ldb + d] for i < m, j < packed.n (overwrites c).
// Precondition has_avx512_bf16(). Single-threaded (the caller runs one call per thread on
// disjoint row blocks of A sharing one PackedB).
void gemm_bf16_packed(const at::BFloat16* a, int64_t lda, int64_t m, const PackedB& b,
                      float* c, int64_t ldc);
// Test hook: a [m, k] bf16, b [n, k] bf16 (CPU, contiguous) -> [m, n] float32 through
// pack_b + gemm_bf16_packed, parallel over row blocks of a with at::parallel_for.
at::Tensor gemm_bf16_for_test(const at::Tensor& a, const at::Tensor& b);
}}
