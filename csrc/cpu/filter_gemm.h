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
// More test hooks: every pair a candidate (the canonical key of all pairs: an oracle of the
// filter's thresholds), and the query rows per chunk of the wide path (<= 0: its rule).
void set_exhaustive(bool on);
bool exhaustive();
void set_wide_chunk_rows(int64_t rows);
int64_t wide_chunk_rows();
// Tests and benchmarks only: off sends every wide chunk through centred_dot (the path
// low_chunk_dot replaces for the bf16 formats), to compare the two; piece_rows > 0 sets
// low_chunk_dot's query piece (<= 0: its rule).
void set_low_chunk(bool on, int64_t piece_rows);

// One side of the cross terms in the filter's format: the centred float32 (or float64) rows
// and, for bf16 / bf16x3, their bfloat16 form (bf16x3: per reduction block, [hi|hi|lo] for
// queries and [hi|lo|hi] for support, so one GEMM gives hi.hi + hi.lo + lo.hi).
struct FilterRows {
  at::Tensor rows;            // [r, D] compute dtype
  at::Tensor low;             // [r, D'] bfloat16 (undefined for fp32)
  std::vector<PackedB> packed;  // support side, kernel backend: one per reduction block
  Bf16Gemm gemm = Bf16Gemm::kSgemm;  // the bfloat16 backend chosen when the rows were made
  at::Tensor residual;          // bf16x3 scratch: one reduction block's residuals
};

// Fills `out` for these rows, reusing its buffers where their shapes fit (tile after tile).
void filter_rows(Filter f, const at::Tensor& centred, bool support_side, FilterRows& out);

// out[i, j] = a_(m0 + i) . b_j for the [mb x nb] block (row stride nb), in format f, summed
// over reduction blocks in order. Runs multithreaded when called outside a parallel region.
void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                float* out);
void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                double* out);

// Scratch of centred_dot, one per thread: one reduction block of a query piece and of a
// support piece, centred and in the filter's format, and the block's product.
template <typename T>
struct CentredScratch {
  std::vector<T> qf, sf, prod;            // centred rows (compute dtype); the block GEMM
  std::vector<float> res;                 // bf16x3 residuals
  std::vector<at::BFloat16> ql, sl;      // bf16 / bf16x3 rows
  PackedB packed;
};

// out[i * ldo + j] = (q_i - c) . (s_j - c) for i < mq, j < ns (q, s rows of D values; c the
// center, or null for no shift) in format f, without a centred copy of the rows: each
// reduction block of both pieces is centred (one rounding, as the row copies filter_rows
// takes) and converted in the cache, multiplied, and the blocks summed in order. The same
// arithmetic as filter_dot, so the same margin. Single-threaded (the wide path runs one
// piece per thread).
void centred_dot(Filter f, const float* q, int64_t mq, const float* s, int64_t ns,
                 const float* c, int64_t d, float* out, int64_t ldo,
                 CentredScratch<float>& w);
void centred_dot(Filter f, const double* q, int64_t mq, const double* s, int64_t ns,
                 const double* c, int64_t d, double* out, int64_t ldo,
                 CentredScratch<double>& w);

// The cross terms of a chunk of query rows against all n support rows for the bf16 formats,
// out[i * ldo + j] = (q_i - c) . (s_j - c) with centred_dot's arithmetic (the same bits),
// but each side centred and converted once per query piece: the piece's rows to a bfloat16
// copy (at most 64 MiB), then one work unit per 128..512 support rows (two or more per
// thread), each support block centred and converted once for all the piece's rows (in one
// pass for bf16). centred_dot converts both sides again for every (query piece, support
// piece) and through a float32 copy. Multithreaded. Returns false, computing nothing, for
// fp32, float64, inside a parallel region or where two units per thread would hold fewer
// than 128 support rows (the caller then uses centred_dot).
bool low_chunk_dot(Filter f, const float* q, int64_t mq, const float* s, int64_t n,
                   const float* c, int64_t d, float* out, int64_t ldo);
bool low_chunk_dot(Filter f, const double* q, int64_t mq, const double* s, int64_t n,
                   const double* c, int64_t d, double* out, int64_t ldo);

} // namespace cpu
} // namespace pdepth
