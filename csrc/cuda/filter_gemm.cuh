// The CUDA filter GEMMs (docs/design.md section 6.6): cross terms a.b of the centred rows in
// the filter's format through cuBLASLt on pdepth's own handle (torch's cuBLAS handle and its
// math mode are never touched), over the reduction dimension in blocks of kCudaReduceBlock
// summed in order. Only the filter uses them: the output never depends on them.
#pragma once

#include "../knn.h"

#include <cuda_runtime.h>

namespace pdepth {
namespace cuda {

// One side of the cross terms in a filter format: `rows` rows of D values, row r's reduction
// block j starting at element r * ld + j * width * kCudaReduceBlock of `ptr` (width 3 for
// bf16x3, whose block holds [hi|hi|lo] (queries) or [hi|lo|hi] (support), else 1).
struct GemmRows {
  const void* ptr = nullptr;
  int64_t ld = 0;
  at::ScalarType dtype = at::kFloat;  // kFloat, kDouble or kBFloat16
  at::Tensor storage;                 // the converted copy (undefined: ptr is the input)
};

// Rows r0..r0+rows of x [*, D] (contiguous; float16, bfloat16, float32 or float64), minus
// `center` [D] in the compute dtype (undefined: no shift), in format f (compute dtype for
// fp32 / tf32, bfloat16 rounded to nearest for bf16 / bf16x3). Raw rows are used in place
// when no conversion is needed. Runs on `stream`.
GemmRows gemm_rows(Filter f, const at::Tensor& x, int64_t r0, int64_t rows,
                   const at::Tensor& center, bool support_side, cudaStream_t stream);

// Bytes per element of D that gemm_rows allocates for format f (0: rows used in place).
int64_t gemm_rows_bytes(Filter f, at::ScalarType input, bool shifted);

// out[i * nb + j] = q_i . s_j (i < mb, j < nb; float32, or float64 for float64 rows) in
// format f: one cuBLASLt GEMM per reduction block, later blocks added in order (beta = 1).
void filter_gemm(Filter f, const GemmRows& q, int64_t mb, const GemmRows& s, int64_t nb,
                 int64_t d, void* out, cudaStream_t stream);

} // namespace cuda
} // namespace pdepth
