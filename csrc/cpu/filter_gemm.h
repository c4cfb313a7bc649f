// The CPU filter GEMMs (docs/design.md section 6): cross terms a.b of the centred rows in the
// filter's format, over the reduction dimension in blocks of kReduceBlock whose results are
// summed in a fixed order, so the rounding bound grows with the block width plus the number
// of blocks rather than with D. Only the filter uses them: the output never depends on them.
#pragma once

#include "../knn.h"

#include "gemm_bf16.h"

#include <string>
#include <vector>

namespace pdepth {
namespace cpu {

// How a bfloat16 GEMM with float32 accumulation is computed: pdepth's AVX512-BF16 kernel,
// MKL's cblas_gemm_bf16bf16f32 (bundled with torch on x86; AMX where present), or float32
// sgemm on the bfloat16 values widened (exact products, float32 sums: the same error model,
// available everywhere, no faster than fp32).
enum class Bf16Gemm : int { kKernel = 0, kMkl = 1, kSgemm = 2 };
Bf16Gemm bf16_gemm();
const char* bf16_gemm_name(Bf16Gemm g);
bool mkl_bf16_available();

// Test hooks (pdepth._C._knn_test_hooks): force a bfloat16 backend ("" = automatic) and the
// per-tile candidate budget of the low-precision filters (negative = the default rule).
void set_bf16_gemm_override(const std::string& name);
void set_fallback_budget(double pairs_fraction);
double fallback_budget();

// One side of the cross terms in the filter's format: the centred float32 (or float64) rows
// and, for bf16 / bf16x3, their bfloat16 form (bf16x3: per reduction block, [hi|hi|lo] for
// queries and [hi|lo|hi] for support, so one GEMM gives hi.hi + hi.lo + lo.hi).
struct FilterRows {
  at::Tensor rows;            // [r, D] compute dtype
  at::Tensor low;             // [r, D'] bfloat16 (undefined for fp32)
  std::vector<PackedB> packed;  // support side, kernel backend: one per reduction block
  Bf16Gemm gemm = Bf16Gemm::kSgemm;  // the bfloat16 backend chosen when the rows were made
  at::Tensor hi, residual;      // bf16x3 scratch
};

// Fills `out` for these rows, reusing its buffers where their shapes fit (tile after tile).
void filter_rows(Filter f, const at::Tensor& centred, bool support_side, FilterRows& out);

// out[i, j] = a_(m0 + i) . b_j for the [mb x nb] block (row stride nb), in format f, summed
// over reduction blocks in order. Runs multithreaded when called outside a parallel region.
void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                float* out);
void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                double* out);

} // namespace cpu
} // namespace pdepth
