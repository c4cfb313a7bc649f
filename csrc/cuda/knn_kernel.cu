// CUDA kernels of the pdepth ops. Per (query block, support tile): cuBLAS computes the
// cross terms q.s into a bounded tile buffer, then one fused kernel per tile turns them into
// distances, filters them against each query's running k-th best, merges the survivors into
// the running top-k kept in shared memory, and (on the last tile of knn_vote) votes. The
// M x N distance matrix never exists: memory is O(M*k + tile).
#include "../knn.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

namespace pdepth {
namespace {

constexpr int kThreads = 128;            // threads per query row in the select kernel
constexpr int kRound = 1024;             // keys scanned between merges = candidate buffer
constexpr int kCandPerThread = kRound / kThreads;
constexpr int64_t kMaxK = 1024;          // largest k (+ dropped nearest) kept on the GPU
constexpr int kStatePerThread = static_cast<int>(kMaxK / kThreads);
constexpr int64_t kQueryBlock = 8192;    // queries per GEMM
constexpr int64_t kTileElems = 1 << 25;  // cross-term tile: 128 MiB of float32

// ---------------------------------------------------------------------------------------
// Squared row norms, one warp per row, accumulated in double (as on the CPU).
template <typename scalar_t, typename T>
__global__ void row_sqnorms_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t d,
                                   T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) {
    return;
  }
  const scalar_t* p = x + row * d;
  double acc = 0.0;
  for (int64_t j = lane; j < d; j += 32) {
    const double v = static_cast<double>(static_cast<T>(p[j]));
    acc += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) {
    acc += __shfl_down_sync(0xffffffffu, acc, off);
  }
  if (lane == 0) {
    out[row] = static_cast<T>(acc);
  }
}

template <typename scalar_t, typename T>
at::Tensor row_sqnorms(const at::Tensor& x, cudaStream_t stream) {
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  if (rows == 0) {
    return out;
  }
  constexpr int kWarps = 8;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  row_sqnorms_kernel<scalar_t, T><<<blocks, kWarps * 32, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), rows, x.size(1), out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

__device__ __forceinline__ float fma_t(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_t(double a, double b, double c) { return fma(a, b, c); }

// The canonical key (knn.h): lane l sums (a_d - b_d)^2 over d = l mod 32 in order with
// fused multiply-adds, then a fixed xor-butterfly; every lane ends with the same bits, and
// the value depends only on the two rows, never on the tile or the GEMM that found the pair.
template <typename scalar_t, typename T>
__device__ __forceinline__ T warp_canonical_sqdist(const scalar_t* a, const scalar_t* b,
                                                   int64_t d, int lane) {
  T acc = T(0);
  for (int64_t j = lane; j < d; j += 32) {
    const T diff = static_cast<T>(a[j]) - static_cast<T>(b[j]);
    acc = fma_t(diff, diff, acc);
  }
  for (int off = 16; off > 0; off >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
  }
  return acc;
}

// ---------------------------------------------------------------------------------------
// Restores the math mode of torch's shared cuBLAS handle: the filter's setting must not leak
// into the user's own matmuls.
class MathModeGuard {
 public:
  MathModeGuard(cublasHandle_t handle, cublasMath_t mode) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetMathMode(handle_, &saved_));
    TORCH_CUDABLAS_CHECK(cublasSetMathMode(handle_, mode));
  }
  ~MathModeGuard() {
    cublasSetMathMode(handle_, saved_);  // no throw from a destructor
  }
  MathModeGuard(const MathModeGuard&) = delete;
  MathModeGuard& operator=(const MathModeGuard&) = delete;

 private:
  cublasHandle_t handle_;
  cublasMath_t saved_ = CUBLAS_DEFAULT_MATH;
};

// The rows one side of the GEMM reads in the filter's format: the inputs as they are (fp32,
// tf32), rounded to bfloat16 (bf16), or split per element into [hi|hi|lo] (queries) and
// [hi|lo|hi] (support) so one GEMM gives hi.hi + hi.lo + lo.hi (bf16x3).
at::Tensor filter_rows(Filter f, const at::Tensor& x, bool support_side) {
  if (f == Filter::kFp32 || f == Filter::kTf32) {
    return x;
  }
  const at::Tensor hi = x.to(at::kBFloat16);
  if (f == Filter::kBf16) {
    return hi;
  }
  const at::Tensor lo = (x.to(at::kFloat) - hi.to(at::kFloat)).to(at::kBFloat16);
  return support_side ? at::cat({hi, lo, hi}, 1) : at::cat({hi, hi, lo}, 1);
}

// Cross terms out[i, j] = a[m0 + i] . b[n0 + j] for an [mb x nb] tile, row-major with
// leading dimension nb, from rows in the filter's format. fp32: float32 math (TF32 off) or
// float64; tf32: TF32 tensor cores; bf16 / bf16x3: bfloat16 tensor cores, float32 accumulation.
void gemm_cross(Filter f, const at::Tensor& a, int64_t m0, int64_t mb, const at::Tensor& b,
                int64_t n0, int64_t nb, at::Tensor& out) {
  const int64_t d = a.size(1);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to current stream
  const MathModeGuard mode(handle, CUBLAS_DEFAULT_MATH);
  cudaDataType_t in_type = CUDA_R_32F;
  cudaDataType_t out_type = CUDA_R_32F;
  cublasComputeType_t compute =
      f == Filter::kTf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  switch (a.scalar_type()) {
    case at::kDouble:
      in_type = out_type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
      break;
    case at::kHalf:
      in_type = CUDA_R_16F;
      break;
    case at::kBFloat16:
      in_type = CUDA_R_16BF;
      break;
    default:
      break;
  }
  if (in_type != CUDA_R_32F && compute == CUBLAS_COMPUTE_32F_FAST_TF32) {
    compute = CUBLAS_COMPUTE_32F;  // 16-bit inputs: their products are exact already
  }
  const double one_d = 1.0, zero_d = 0.0;
  const float one_f = 1.0f, zero_f = 0.0f;
  const bool dbl = a.scalar_type() == at::kDouble;
  const int64_t es = a.element_size();
  const char* bp = static_cast<const char*>(b.const_data_ptr()) + n0 * d * es;
  const char* ap = static_cast<const char*>(a.const_data_ptr()) + m0 * d * es;
  // Column-major view: out^T [nb x mb] = B_tile [nb x d] * A_block^T [d x mb].
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N,
      static_cast<int>(nb), static_cast<int>(mb), static_cast<int>(d),
      dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f),
      bp, in_type, static_cast<int>(d), ap, in_type, static_cast<int>(d),
      dbl ? static_cast<const void*>(&zero_d) : static_cast<const void*>(&zero_f),
      out.mutable_data_ptr(), out_type, static_cast<int>(nb), compute, CUBLAS_GEMM_DEFAULT));
}

// ---------------------------------------------------------------------------------------
// Block-wide merge of c unsorted candidates (distinct indices; those that rank at kk or
// beyond are simply dropped) into the sorted state of size kk, both in shared memory. Every
// element's final position is its rank: its own position in its list plus the number of
// elements of the other list that come before it under knn_less. Ranks form a permutation,
// so the result does not depend on the order in which candidates were appended.
template <typename T>
__device__ void merge_candidates(T* sd, int64_t* si, int kk, const T* cd, const int64_t* ci,
                                 int c) {
  T keep_d[kStatePerThread + kCandPerThread];
  int64_t keep_i[kStatePerThread + kCandPerThread];
  int keep_pos[kStatePerThread + kCandPerThread];
  int n_keep = 0;
  for (int t = 0; t < kStatePerThread; ++t) {
    const int a = threadIdx.x + t * kThreads;
    if (a < kk) {
      const T d = sd[a];
      const int64_t i = si[a];
      int pos = a;
      for (int b = 0; b < c && pos < kk; ++b) {
        pos += knn_less(cd[b], ci[b], d, i) ? 1 : 0;
      }
      if (pos < kk) {
        keep_d[n_keep] = d;
        keep_i[n_keep] = i;
        keep_pos[n_keep++] = pos;
      }
    }
  }
  for (int t = 0; t < kCandPerThread; ++t) {
    const int b = threadIdx.x + t * kThreads;
    if (b < c) {
      const T d = cd[b];
      const int64_t i = ci[b];
      int pos = 0;
      for (int b2 = 0; b2 < c && pos < kk; ++b2) {
        pos += knn_less(cd[b2], ci[b2], d, i) ? 1 : 0;
      }
      // Binary search: number of state entries before (d, i).
      int lo = 0, hi = kk;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (knn_less(sd[mid], si[mid], d, i)) {
          lo = mid + 1;
        } else {
          hi = mid;
        }
      }
      pos += lo;
      if (pos < kk) {
        keep_d[n_keep] = d;
        keep_i[n_keep] = i;
        keep_pos[n_keep++] = pos;
      }
    }
  }
  __syncthreads();  // every read of the old state is done
  for (int t = 0; t < n_keep; ++t) {
    sd[keep_pos[t]] = keep_d[t];
    si[keep_pos[t]] = keep_i[t];
  }
  __syncthreads();
}

// Block-wide uniform vote over k labels in shared memory: the largest count wins, ties to
// the lowest class; -1 (an empty slot) does not vote, and a row without labels votes -1.
// O(k^2 / threads) comparisons, independent of the number of classes.
__device__ int64_t block_vote(const int64_t* labels, int k) {
  __shared__ int64_t warp_best[kThreads / 32];
  __shared__ int warp_count[kThreads / 32];
  int best_count = 0;
  int64_t best = std::numeric_limits<int64_t>::max();
  for (int j = threadIdx.x; j < k; j += kThreads) {
    const int64_t lab = labels[j];
    if (lab < 0) {
      continue;
    }
    int cnt = 0;
    for (int j2 = 0; j2 < k; ++j2) {
      cnt += labels[j2] == lab ? 1 : 0;
    }
    if (cnt > best_count || (cnt == best_count && lab < best)) {
      best_count = cnt;
      best = lab;
    }
  }
  for (int off = 16; off > 0; off >>= 1) {
    const int oc = __shfl_down_sync(0xffffffffu, best_count, off);
    const int64_t ob = __shfl_down_sync(0xffffffffu, best, off);
    if (oc > best_count || (oc == best_count && ob < best)) {
      best_count = oc;
      best = ob;
    }
  }
  if (threadIdx.x % 32 == 0) {
    warp_best[threadIdx.x / 32] = best;
    warp_count[threadIdx.x / 32] = best_count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) {
      if (warp_count[w] > best_count || (warp_count[w] == best_count && warp_best[w] < best)) {
        best_count = warp_count[w];
        best = warp_best[w];
      }
    }
  }
  return best_count > 0 ? best : int64_t{-1};  // valid in thread 0
}

// One block per query row of the tile. The running top-k (sorted, canonical keys) lives in
// global memory between tiles and in shared memory during one. GEMM keys are filtered
// against the k-th best with the filter margin in rounds of kRound; only rounds that
// produced candidates pay for their canonical keys (one warp per candidate) and a merge.
template <typename scalar_t, typename T, bool kVote>
__global__ void __launch_bounds__(kThreads) select_tile_kernel(
    const T* __restrict__ dot, int64_t nb, const scalar_t* __restrict__ qrows,
    const scalar_t* __restrict__ srows, int64_t d, const T* __restrict__ qnorm,
    const T* __restrict__ snorm, int64_t gbase, const int64_t* __restrict__ self,
    T* __restrict__ top_d, int64_t* __restrict__ top_i, int kk, int skip,
    const int64_t* __restrict__ labels, int64_t* __restrict__ pred, T keep, T grow, T slack) {
  extern __shared__ unsigned char smem[];
  int64_t* si = reinterpret_cast<int64_t*>(smem);
  int64_t* ci = si + kk;
  T* sd = reinterpret_cast<T*>(ci + kRound);
  T* cd = sd + kk;
  __shared__ int count;

  const int64_t row = blockIdx.x;
  for (int j = threadIdx.x; j < kk; j += kThreads) {
    sd[j] = top_d[row * kk + j];
    si[j] = top_i[row * kk + j];
  }
  const T qn = qnorm[row];
  const int64_t self_g = self != nullptr ? self[row] : -1;
  const T* drow = dot + row * nb;
  const scalar_t* qrow = qrows + row * d;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();
  // The threshold for lower bounds: the k-th best canonical key grown by its own rounding
  // bound, plus the slack for flushed denormals (knn.h).
  T thr_d = sd[kk - 1] * grow + slack;
  bool changed = false;
  for (int64_t r0 = 0; r0 < nb; r0 += kRound) {
    if (threadIdx.x == 0) {
      count = 0;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kCandPerThread; ++t) {
      const int64_t j = r0 + t * kThreads + threadIdx.x;
      if (j < nb) {
        const T lower = filter_bound(qn, snorm[j], drow[j], keep);
        const int64_t g = gbase + j;
        if (lower <= thr_d && g != self_g) {
          ci[atomicAdd(&count, 1)] = g;
        }
      }
    }
    __syncthreads();
    const int c = count;  // block-uniform
    if (c > 0) {
      for (int b = warp; b < c; b += kThreads / 32) {
        const int64_t j = ci[b] - gbase;
        const T key = warp_canonical_sqdist<scalar_t, T>(qrow, srows + j * d, d, lane);
        if (lane == 0) {
          cd[b] = key;
        }
      }
      __syncthreads();
      merge_candidates<T>(sd, si, kk, cd, ci, c);
      thr_d = sd[kk - 1] * grow + slack;
      changed = true;
    }
  }
  if (changed) {
    for (int j = threadIdx.x; j < kk; j += kThreads) {
      top_d[row * kk + j] = sd[j];
      top_i[row * kk + j] = si[j];
    }
  }
  if constexpr (kVote) {
    const int k = kk - skip;
    for (int j = threadIdx.x; j < k; j += kThreads) {
      const int64_t g = si[skip + j];
      ci[j] = g >= 0 ? labels[g] : int64_t{-1};
    }
    __syncthreads();
    const int64_t p = block_vote(ci, k);
    if (threadIdx.x == 0) {
      pred[row] = p;
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    vote_kernel(const int64_t* __restrict__ labels, int64_t k, int64_t* __restrict__ pred) {
  const int64_t p = block_vote(labels + static_cast<int64_t>(blockIdx.x) * k, static_cast<int>(k));
  if (threadIdx.x == 0) {
    pred[blockIdx.x] = p;
  }
}

// ---------------------------------------------------------------------------------------
// Runs the tiles. `labels`/`pred` set: vote on the last tile (knn_vote).
template <typename scalar_t, typename T>
void knn_cuda_run(const char* op, const at::Tensor& q, const at::Tensor& s, const at::Tensor& self_index,
                  at::Tensor& top_d, at::Tensor& top_i, int64_t kk, int64_t skip,
                  int64_t offset, Filter filter, const at::Tensor& labels, at::Tensor* pred) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t m = q.size(0);
  const int64_t n = s.size(0);
  const int64_t d = q.size(1);
  const at::Tensor qn = row_sqnorms<scalar_t, T>(q, stream);
  const at::Tensor sn = row_sqnorms<scalar_t, T>(s, stream);
  check_finite_rows(op, "queries", qn);
  check_finite_rows(op, "support", sn);
  const auto [qmax, smax] = check_distance_range(op, qn, sn);
  const bool dbl = std::is_same_v<T, double>;
  const FilterMargin fm = filter_margin(filter, d, dbl, at::kCUDA);
  const T keep = static_cast<T>(fm.keep);
  const T grow = static_cast<T>(fm.grow);
  const T slack = static_cast<T>(filter_slack(d, dbl, qmax, smax));
  const at::Tensor q_gemm = filter_rows(filter, q, false);
  const at::Tensor s_gemm = filter_rows(filter, s, true);

  const int64_t qb = std::min<int64_t>(m, int64_t{kQueryBlock});
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(n, int64_t{kTileElems} / qb));
  at::Tensor dot = at::empty({qb * tile}, q.options().dtype(c10::CppTypeToScalarType<T>::value));
  const size_t smem = static_cast<size_t>(kk + kRound) * (sizeof(T) + sizeof(int64_t));
  const int64_t* self = self_index.defined() ? self_index.const_data_ptr<int64_t>() : nullptr;
  const int64_t* lab = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();

  for (int64_t m0 = 0; m0 < m; m0 += qb) {
    const int64_t mb = std::min(qb, m - m0);
    T* td = top_d.mutable_data_ptr<T>() + m0 * kk;
    int64_t* ti = top_i.mutable_data_ptr<int64_t>() + m0 * kk;
    const int64_t* sf = self != nullptr ? self + m0 : nullptr;
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nb = std::min(tile, n - n0);
      gemm_cross(filter, q_gemm, m0, mb, s_gemm, n0, nb, dot);
      const bool vote = pred != nullptr && n0 + nb >= n;
      auto kernel = vote ? select_tile_kernel<scalar_t, T, true>
                         : select_tile_kernel<scalar_t, T, false>;
      kernel<<<mb, kThreads, smem, stream>>>(dot.const_data_ptr<T>(), nb, qp + m0 * d,
          sp + n0 * d, d, qn.const_data_ptr<T>() + m0, sn.const_data_ptr<T>() + n0,
          offset + n0, sf, td, ti, static_cast<int>(kk), static_cast<int>(skip),
          vote ? lab : nullptr, vote ? pred->mutable_data_ptr<int64_t>() + m0 : nullptr,
          keep, grow, slack);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_add(kStatTiles, 1);
      stats_add(pairs_stat(filter), mb * nb);
    }
  }
  stats_add(kStatCalls, 1);
}

std::tuple<at::Tensor, at::Tensor> knn_cuda_checked(
    const char* op, const at::Tensor& queries, const at::Tensor& support, int64_t kk, int64_t skip,
    const c10::optional<at::Tensor>& self_index, const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index, int64_t offset, c10::string_view filter_arg,
    const at::Tensor& labels, at::Tensor* pred) {
  const Filter filter = resolve_filter(
      op, filter_arg, at::kCUDA, queries.scalar_type(), queries.size(1));
  // Namespace-scope constexprs are passed by value: nvcc gives them no host storage that a
  // reference could bind to.
  const int64_t max_k = kMaxK;
  TORCH_CHECK_VALUE(kk <= max_k, op, "(): the CUDA kernel supports k up to ", max_k,
      " (including a dropped nearest), got ", kk);
  TORCH_CHECK_VALUE(queries.size(1) <= std::numeric_limits<int>::max(),
      op, "(): D must fit in int32 for cuBLAS, got ", queries.size(1));
  const c10::cuda::CUDAGuard guard(queries.device());
  const auto compute = knn_compute_dtype(queries.scalar_type());
  const int64_t m = queries.size(0);
  const auto fopts = queries.options().dtype(compute);
  at::Tensor top_d, top_i;
  if (prev_dist.has_value()) {
    top_d = prev_dist->contiguous().clone();  // never modify the caller's running top-k
    top_i = prev_index->contiguous().clone();
  } else {
    top_d = at::full({m, kk}, std::numeric_limits<double>::infinity(), fopts);
    top_i = at::full({m, kk}, -1, queries.options().dtype(at::kLong));
  }
  if (m > 0) {
    const at::Tensor q = queries.contiguous();
    const at::Tensor s = support.contiguous();
    const at::Tensor si = self_index_or_empty(self_index);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "knn_cuda", [&] {
      using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      knn_cuda_run<scalar_t, T>(
          op, q, s, si, top_d, top_i, kk, skip, offset, filter, labels, pred);
    });
  }
  if (skip == 0) {
    return {top_d, top_i};
  }
  return {top_d.narrow(1, skip, kk - skip).contiguous(),
          top_i.narrow(1, skip, kk - skip).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> knn_cuda(
    const at::Tensor& queries, const at::Tensor& support, int64_t k,
    const c10::optional<at::Tensor>& self_index, int64_t skip,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset, c10::string_view filter) {
  const int64_t kk = check_knn_args(
      "knn", queries, support, k, self_index, skip, prev_dist, prev_index, offset);
  return knn_cuda_checked("knn", queries, support, kk, skip, self_index, prev_dist,
      prev_index, offset, filter, at::Tensor(), nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cuda(
    const at::Tensor& queries, const at::Tensor& support, const at::Tensor& support_labels,
    int64_t k, int64_t num_classes, const c10::optional<at::Tensor>& self_index,
    int64_t skip, c10::string_view filter) {
  const int64_t kk = check_knn_vote_args(
      queries, support, support_labels, k, num_classes, self_index, skip);
  at::Tensor pred = at::empty({queries.size(0)}, queries.options().dtype(at::kLong));
  auto [dist, index] = knn_cuda_checked("knn_vote", queries, support, kk, skip, self_index,
      c10::nullopt, c10::nullopt, 0, filter, support_labels.contiguous(), &pred);
  return {pred, dist, index};
}

at::Tensor vote_cuda(const at::Tensor& neighbor_labels, int64_t num_classes) {
  check_vote_args("vote", neighbor_labels, num_classes);
  TORCH_CHECK_VALUE(neighbor_labels.size(1) <= std::numeric_limits<int>::max(),
      "vote(): k must fit in int32, got ", neighbor_labels.size(1));
  const c10::cuda::CUDAGuard guard(neighbor_labels.device());
  const at::Tensor nl = neighbor_labels.contiguous();
  const int64_t m = nl.size(0);
  at::Tensor pred = at::empty({m}, nl.options());
  if (m > 0) {
    vote_kernel<<<m, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        nl.const_data_ptr<int64_t>(), nl.size(1), pred.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return pred;
}

} // namespace
} // namespace pdepth

TORCH_LIBRARY_IMPL(pdepth, CUDA, m) {
  m.impl("knn", &pdepth::knn_cuda);
  m.impl("knn_vote", &pdepth::knn_vote_cuda);
  m.impl("vote", &pdepth::vote_cuda);
}
