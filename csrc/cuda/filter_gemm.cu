// CUDA filter GEMMs (filter_gemm.cuh): the rows converted to the filter's format by one
// kernel (shift, bfloat16 rounding to nearest, bf16x3 split per reduction block), then
// cuBLASLt on pdepth's own handle with the format's compute type: float32 (TF32 off) or
// float64 for fp32, TF32 for tf32, bfloat16 inputs with float32 accumulation otherwise.
#include "filter_gemm.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <cublasLt.h>

#include <memory>
#include <mutex>
#include <vector>

namespace pdepth {
namespace cuda {
namespace {

constexpr int kConvThreads = 256;
// Largest workspace offered to cuBLASLt (from torch's caching allocator, per GEMM).
constexpr uint64_t kWorkspaceBytes = uint64_t(32) << 20;

enum class Conv : int { kCopy = 0, kBf16 = 1, kBf16x3 = 2 };

// One element per thread (grid-stride): v = T(x) - c (one rounding, as on the CPU), written
// as T (kCopy), bfloat16 (kBf16), or hi = bf16(v), lo = bf16(v - hi) (v - hi exact in float32)
// into the element's reduction block as [hi|hi|lo] (queries) or [hi|lo|hi] (support).
template <typename scalar_t, typename T, typename out_t>
__global__ void convert_rows_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t d,
                                    const T* __restrict__ center, Conv conv, bool support,
                                    out_t* __restrict__ out, int64_t ld) {
  const int64_t total = rows * d;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / d;
    const int64_t j = e - r * d;
    T v = static_cast<T>(x[e]);
    if (center != nullptr) {
      v = v - center[j];
    }
    if (conv != Conv::kBf16x3) {
      out[r * ld + j] = static_cast<out_t>(v);
      continue;
    }
    const int64_t off = (j / kCudaReduceBlock) * kCudaReduceBlock;
    const int64_t len = d - off < kCudaReduceBlock ? d - off : kCudaReduceBlock;
    const int64_t t = j - off;
    const out_t hi = static_cast<out_t>(v);
    const out_t lo = static_cast<out_t>(static_cast<float>(v) - static_cast<float>(hi));
    out_t* base = out + r * ld + 3 * off + t;
    base[0] = hi;
    base[len] = support ? lo : hi;
    base[2 * len] = support ? hi : lo;
  }
}

template <typename T, typename out_t>
void launch_convert(const at::Tensor& x, int64_t r0, int64_t rows, const T* center, Conv conv,
                    bool support, out_t* out, int64_t ld, cudaStream_t stream) {
  const int64_t d = x.size(1);
  const int64_t total = rows * d;
  if (total == 0) {
    return;
  }
  const int64_t blocks = std::min<int64_t>((total + kConvThreads - 1) / kConvThreads, 65536);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gemm_rows", [&] {
    convert_rows_kernel<scalar_t, T, out_t><<<blocks, kConvThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>() + r0 * d, rows, d, center, conv, support, out, ld);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// pdepth's cuBLASLt handle of the current device: created on first use, kept for the process
// (destroying it at exit could run after the CUDA runtime has shut down). cuBLASLt handles
// hold no stream or math mode, so threads may share one.
cublasLtHandle_t lt_handle() {
  static std::mutex mu;
  static std::vector<cublasLtHandle_t> handles;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(handles.size()) <= dev) {
    handles.resize(dev + 1, nullptr);
  }
  if (handles[dev] == nullptr) {
    TORCH_CUDABLAS_CHECK(cublasLtCreate(&handles[dev]));
  }
  return handles[dev];
}

// The largest power of two (up to 256) dividing a pointer: cuBLASLt's heuristics assume
// 256-byte alignment unless told otherwise.
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t al = 256;
  while (al > 1 && a % al != 0) {
    al /= 2;
  }
  return al;
}

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
};
struct PrefDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
    cublasLtMatmulPreferenceDestroy(p);
  }
};
using Desc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using Pref = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PrefDeleter>;

Layout make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&l, type, rows, cols, ld));
  return Layout(l);
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return CUDA_R_64F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// Column-major view of c [m x n] (ldc) = a^T b (+ c when accumulate), a [k x m] (lda),
// b [k x n] (ldb): the row-major out [n x m] = q [n x k] . s [m x k]^T.
void lt_gemm(cublasComputeType_t compute, cudaDataType_t in, cudaDataType_t acc, int64_t m,
             int64_t n, int64_t k, const void* a, int64_t lda, const void* b, int64_t ldb,
             void* c, int64_t ldc, bool accumulate, cudaStream_t stream) {
  cublasLtHandle_t handle = lt_handle();
  cublasLtMatmulDesc_t raw_desc = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, acc));
  const Desc desc(raw_desc);
  const cublasOperation_t ta = CUBLAS_OP_T;
  const cublasOperation_t tb = CUBLAS_OP_N;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(
      raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(
      raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const Layout la = make_layout(in, k, m, lda);
  const Layout lb = make_layout(in, k, n, ldb);
  const Layout lc = make_layout(acc, m, n, ldc);
  cublasLtMatmulPreference_t raw_pref = nullptr;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const Pref pref(raw_pref);
  const uint64_t ws = kWorkspaceBytes;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const uint32_t align_a = alignment(a), align_b = alignment(b), align_c = alignment(c);
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c)));
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
      raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_c, sizeof(align_c)));
  cublasLtMatmulHeuristicResult_t heur = {};
  int found = 0;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(
      handle, raw_desc, la.get(), lb.get(), lc.get(), lc.get(), raw_pref, 1, &heur, &found));
  TORCH_CHECK(found > 0, "knn(): cuBLASLt has no algorithm for the filter GEMM (", m, " x ",
      n, " x ", k, ")");
  at::Tensor workspace;
  void* ws_ptr = nullptr;
  if (heur.workspaceSize > 0) {
    workspace = at::empty({static_cast<int64_t>(heur.workspaceSize)},
        at::TensorOptions().dtype(at::kByte).device(at::kCUDA, c10::cuda::current_device()));
    ws_ptr = workspace.mutable_data_ptr();
  }
  const float one_f = 1.0f, zero_f = 0.0f;
  const double one_d = 1.0, zero_d = 0.0;
  const bool dbl = acc == CUDA_R_64F;
  const void* alpha = dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  const void* beta = accumulate ? alpha
      : (dbl ? static_cast<const void*>(&zero_d) : static_cast<const void*>(&zero_f));
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(handle, raw_desc, alpha, a, la.get(), b, lb.get(), beta,
      c, lc.get(), c, lc.get(), &heur.algo, ws_ptr, heur.workspaceSize, stream));
}

} // namespace

int64_t gemm_rows_bytes(Filter f, at::ScalarType input, bool shifted) {
  switch (f) {
    case Filter::kBf16:
      return 2;
    case Filter::kBf16x3:
      return 6;
    default: {
      const bool in_place = !shifted && (input == at::kFloat || input == at::kDouble);
      return in_place ? 0 : (input == at::kDouble ? 8 : 4);
    }
  }
}

GemmRows gemm_rows(Filter f, const at::Tensor& x, int64_t r0, int64_t rows,
                   const at::Tensor& center, bool support_side, cudaStream_t stream) {
  const int64_t d = x.size(1);
  const bool dbl = x.scalar_type() == at::kDouble;
  GemmRows out;
  if (gemm_rows_bytes(f, x.scalar_type(), center.defined()) == 0) {
    out.ptr = static_cast<const char*>(x.const_data_ptr()) + r0 * d * x.element_size();
    out.ld = d;
    out.dtype = x.scalar_type();
    return out;
  }
  const bool low = f == Filter::kBf16 || f == Filter::kBf16x3;
  const int64_t width = f == Filter::kBf16x3 ? 3 * d : d;
  out.ld = (width + 7) / 8 * 8;  // 16-byte rows for the tensor cores
  out.dtype = low ? at::kBFloat16 : (dbl ? at::kDouble : at::kFloat);
  out.storage = at::empty({rows, out.ld}, x.options().dtype(out.dtype));
  out.ptr = out.storage.const_data_ptr();
  const Conv conv = f == Filter::kBf16x3 ? Conv::kBf16x3 : (low ? Conv::kBf16 : Conv::kCopy);
  if (dbl) {
    const double* c = center.defined() ? center.const_data_ptr<double>() : nullptr;
    launch_convert<double, double>(x, r0, rows, c, conv, support_side,
        out.storage.mutable_data_ptr<double>(), out.ld, stream);
    return out;
  }
  const float* c = center.defined() ? center.const_data_ptr<float>() : nullptr;
  if (low) {
    launch_convert<float, at::BFloat16>(x, r0, rows, c, conv, support_side,
        out.storage.mutable_data_ptr<at::BFloat16>(), out.ld, stream);
  } else {
    launch_convert<float, float>(x, r0, rows, c, conv, support_side,
        out.storage.mutable_data_ptr<float>(), out.ld, stream);
  }
  return out;
}

void filter_gemm(Filter f, const GemmRows& q, int64_t mb, const GemmRows& s, int64_t nb,
                 int64_t d, void* out, cudaStream_t stream) {
  TORCH_CHECK(q.dtype == s.dtype, "filter_gemm(): rows of different formats");
  const bool dbl = q.dtype == at::kDouble;
  const cudaDataType_t in = cuda_type(q.dtype);
  const cudaDataType_t acc = dbl ? CUDA_R_64F : CUDA_R_32F;
  // fp32: plain float32 (or float64) math, never TF32; bfloat16 inputs: their products are
  // exact in float32, accumulated in float32 on the tensor cores.
  const cublasComputeType_t compute = dbl ? CUBLAS_COMPUTE_64F
      : (f == Filter::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F);
  const int64_t width = f == Filter::kBf16x3 ? 3 : 1;
  const int64_t es = at::elementSize(q.dtype);
  if (d == 0) {  // empty rows: every cross term is 0
    C10_CUDA_CHECK(cudaMemsetAsync(out, 0, mb * nb * (dbl ? 8 : 4), stream));
    return;
  }
  for (int64_t off = 0; off < d; off += kCudaReduceBlock) {
    const int64_t len = std::min(kCudaReduceBlock, d - off);
    const char* a = static_cast<const char*>(s.ptr) + width * off * es;
    const char* b = static_cast<const char*>(q.ptr) + width * off * es;
    lt_gemm(compute, in, acc, nb, mb, width * len, a, s.ld, b, q.ld, out, nb, off > 0, stream);
  }
}

} // namespace cuda
} // namespace pdepth
