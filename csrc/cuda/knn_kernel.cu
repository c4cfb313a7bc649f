// CUDA kernels of the pdepth ops. Per (query block, support tile): cuBLASLt computes the
// cross terms of the centred rows in the filter's format into a bounded tile buffer
// (filter_gemm.cuh; a format that lets too many pairs through is replaced by the next, more
// precise one), then one fused kernel per tile turns them into lower bounds, filters them
// against each query's running k-th best, merges the survivors (ranked by their canonical
// key) into the running top-k kept in shared memory, and (on the last tile of knn_vote)
// votes. The M x N distance matrix never exists: memory is O(M*k + tile).
#include "../knn.h"
#include "../cpu/filter_gemm.h"
#include "filter_gemm.cuh"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace pdepth {
namespace {

constexpr int kThreads = 128;            // threads per query row in the select kernel
constexpr int kRound = 1024;             // keys scanned between merges = candidate buffer
constexpr int kCandPerThread = kRound / kThreads;
constexpr int64_t kMaxK = 1024;          // largest k (+ dropped nearest) kept on the GPU
constexpr int kStatePerThread = static_cast<int>(kMaxK / kThreads);
constexpr int64_t kQueryBlock = 8192;    // queries per GEMM
constexpr int64_t kTileElems = 1 << 25;  // cross-term tile: 128 MiB of float32
// Rows in a filter format (filter_gemm.cuh): at most this many bytes per query block and
// per support tile, but at least kMinRows rows.
constexpr int64_t kConvBytes = int64_t(256) << 20;
constexpr int64_t kMinRows = 128;
// The whole support set is converted once per format (on first use) when that takes at most
// this many bytes; else tile by tile, once per query block (re-converting it for every
// query block is what the limit avoids).
constexpr int64_t kWholeSupportBytes = int64_t(8) << 30;
// The fallback probe (docs/design.md 6.6): the first kProbeRows rows of a block against the
// first kProbeCols columns of the tile.
constexpr int kProbeRows = 32;
constexpr int kProbeCols = 1024;
// The rows are shifted by the queries' mean when its squared norm exceeds 1/kShiftShare of
// the queries' mean squared norm (as on the CPU, csrc/cpu/knn_kernel.cpp).
constexpr double kShiftShare = 16.0;

// ---------------------------------------------------------------------------------------
// Squared row norms of x - center (center null: of x), one warp per row, each centred
// value rounded to T as the GEMM's rows are, then accumulated in double (as on the CPU).
template <typename scalar_t, typename T>
__global__ void row_sqnorms_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t d,
                                   const T* __restrict__ center, T* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) {
    return;
  }
  const scalar_t* p = x + row * d;
  double acc = 0.0;
  for (int64_t j = lane; j < d; j += 32) {
    T t = static_cast<T>(p[j]);
    if (center != nullptr) {
      t = t - center[j];
    }
    const double v = static_cast<double>(t);
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
at::Tensor row_sqnorms(const at::Tensor& x, const at::Tensor& center, cudaStream_t stream) {
  const int64_t rows = x.size(0);
  at::Tensor out = at::empty({rows}, x.options().dtype(c10::CppTypeToScalarType<T>::value));
  if (rows == 0) {
    return out;
  }
  constexpr int kWarps = 8;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  row_sqnorms_kernel<scalar_t, T><<<blocks, kWarps * 32, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), rows, x.size(1),
      center.defined() ? center.const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Column sums [D] of x [rows, D] in double, one thread per column summing the rows in order
// (a fixed order: the center has the same bits on every run).
template <typename scalar_t>
__global__ void column_sums_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t d,
                                   double* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= d) {
    return;
  }
  double acc = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    acc += static_cast<double>(x[r * d + j]);
  }
  out[j] = acc;
}

// The shift of docs/design.md 6.5 (the CPU's rule): the queries' mean, rounded to T, when its
// squared norm exceeds 1/kShiftShare of the queries' mean squared norm `qn`; else undefined
// (no shift). It depends on the queries only, so every streamed chunk gets the same one.
template <typename scalar_t, typename T>
at::Tensor shift_center(const at::Tensor& q, const at::Tensor& qn, cudaStream_t stream) {
  const int64_t m = q.size(0);
  const int64_t d = q.size(1);
  if (m == 0 || d == 0) {
    return at::Tensor();
  }
  at::Tensor sums = at::empty({d}, q.options().dtype(at::kDouble));
  column_sums_kernel<scalar_t><<<(d + 255) / 256, 256, 0, stream>>>(
      q.const_data_ptr<scalar_t>(), m, d, sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor mean = sums.div_(static_cast<double>(m));
  const bool shift = mean.dot(mean).item<double>() * kShiftShare >
      qn.sum(0, false, at::kDouble).item<double>() / static_cast<double>(m);
  return shift ? mean.to(c10::CppTypeToScalarType<T>::value) : at::Tensor();
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
// global memory between tiles and in shared memory during one. Lower bounds are filtered
// against the k-th best with the filter margin in rounds; only rounds that produced
// candidates pay for their canonical keys (one warp per candidate) and a merge. A row whose
// top-k is not full yet (threshold inf) starts with a round of about kk pairs and doubles the
// round after each merge up to kRound, so its first kRound pairs cost about kk log2(kRound /
// kk) canonical keys instead of kRound. `cand` counts the canonical keys.
template <typename scalar_t, typename T, bool kVote>
__global__ void __launch_bounds__(kThreads) select_tile_kernel(
    const T* __restrict__ dot, int64_t nb, const scalar_t* __restrict__ qrows,
    const scalar_t* __restrict__ srows, int64_t d, const T* __restrict__ qnorm,
    const T* __restrict__ snorm, int64_t gbase, const int64_t* __restrict__ self,
    T* __restrict__ top_d, int64_t* __restrict__ top_i, int kk, int skip,
    const int64_t* __restrict__ labels, int64_t* __restrict__ pred, T keep, T grow, T slack,
    unsigned long long* __restrict__ cand) {
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
  int width = thr_d == std::numeric_limits<T>::infinity() ? min(kRound, (kk + 31) / 32 * 32)
                                                         : kRound;
  bool changed = false;
  unsigned long long keys = 0;
  for (int64_t r0 = 0; r0 < nb; r0 += width, width = min(kRound, 2 * width)) {
    if (threadIdx.x == 0) {
      count = 0;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < width; t += kThreads) {
      const int64_t j = r0 + t;
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
      keys += static_cast<unsigned long long>(c);
    }
    __syncthreads();  // every thread has read `count` before it is reset
  }
  if (threadIdx.x == 0 && keys > 0) {
    atomicAdd(cand, keys);
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

// The fallback probe of one row (one block per row, the block's first kProbeRows rows): of
// the first P = min(nb, kProbeCols) pairs, how many lower bounds pass the row's threshold in
// this format. A row whose top-k is not full takes as threshold the ceil(kk P / nb)-th
// smallest upper bound of those P pairs (it stands for the kk-th of the tile), and that many
// passes are expected. out[0] += passes, out[1] += expected, out[2] += P (rows judged). An
// estimate for the choice of format only: the scan's thresholds stay rigorous.
template <typename T>
__global__ void __launch_bounds__(kThreads) probe_kernel(
    const T* __restrict__ dot, int64_t nb, const T* __restrict__ qnorm,
    const T* __restrict__ snorm, int64_t gbase, const int64_t* __restrict__ self,
    const T* __restrict__ top_d, int kk, T keep, T up, T grow, T slack,
    unsigned long long* __restrict__ out) {
  __shared__ T ub[kProbeCols];
  __shared__ T sel;
  __shared__ int passes;
  const int64_t row = blockIdx.x;
  const int p = static_cast<int>(nb < kProbeCols ? nb : kProbeCols);
  const T qn = qnorm[row];
  const T* drow = dot + row * nb;
  const int64_t self_g = self != nullptr ? self[row] : -1;
  T thr = top_d[row * kk + kk - 1] * grow + slack;
  int expected = 0;
  if (threadIdx.x == 0) {
    passes = 0;
  }
  if (thr == std::numeric_limits<T>::infinity()) {
    const bool has_self = self_g >= gbase && self_g < gbase + p;
    const int kq = static_cast<int>((static_cast<int64_t>(kk) * p + nb - 1) / nb);
    if (kq > p - (has_self ? 1 : 0)) {
      return;  // too few pairs to judge this row (block-uniform)
    }
    for (int j = threadIdx.x; j < p; j += kThreads) {
      ub[j] = gbase + j == self_g ? std::numeric_limits<T>::infinity()
                                  : filter_bound(qn, snorm[j], drow[j], up);
    }
    __syncthreads();
    // The kq-th smallest: the one element whose rank (ties by position) is kq - 1.
    for (int j = threadIdx.x; j < p; j += kThreads) {
      const T v = ub[j];
      int rank = 0;
      for (int i = 0; i < p; ++i) {
        rank += (ub[i] < v || (ub[i] == v && i < j)) ? 1 : 0;
      }
      if (rank == kq - 1) {
        sel = v;
      }
    }
    __syncthreads();
    thr = (sel > T(0) ? sel : T(0)) * grow + slack;
    expected = kq;
  }
  __syncthreads();
  int mine = 0;
  for (int j = threadIdx.x; j < p; j += kThreads) {
    mine += (filter_bound(qn, snorm[j], drow[j], keep) <= thr && gbase + j != self_g) ? 1 : 0;
  }
  atomicAdd(&passes, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(out, static_cast<unsigned long long>(passes));
    atomicAdd(out + 1, static_cast<unsigned long long>(expected));
    atomicAdd(out + 2, static_cast<unsigned long long>(p));
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
// The candidate rule of one format in the compute dtype (knn.h, docs/design.md 6.2).
template <typename T>
struct Rule {
  T keep, up, grow, slack;
  bool finite;  // false: the margin is infinite, every pair passes (no point probing)
};

template <typename T>
Rule<T> make_rule(Filter f, int64_t d, double qmax, double smax) {
  const bool dbl = std::is_same_v<T, double>;
  const FilterMargin fm = filter_margin(f, d, dbl, at::kCUDA);
  // The exhaustive test hook (shared with the CPU): an infinite slack, every pair passes.
  const double slack = cpu::exhaustive() ? std::numeric_limits<double>::infinity()
                                         : filter_slack(d, dbl, qmax, smax);
  return Rule<T>{static_cast<T>(fm.keep), static_cast<T>(1.0 + fm.m), static_cast<T>(fm.grow),
      static_cast<T>(slack), std::isfinite(fm.m)};
}

// The formats a requested filter falls back through, most precise last. On the tensor cores
// three bfloat16 products cost less than one float32 (CUDA-core) product, so bf16x3 always
// sits between the fast formats and fp32.
std::vector<Filter> fallback_chain(Filter f) {
  switch (f) {
    case Filter::kBf16:
      return {Filter::kBf16, Filter::kBf16x3, Filter::kFp32};
    case Filter::kTf32:
      return {Filter::kTf32, Filter::kBf16x3, Filter::kFp32};
    case Filter::kBf16x3:
      return {Filter::kBf16x3, Filter::kFp32};
    default:
      return {Filter::kFp32};
  }
}

// Per-call state of the tile loop: the inputs, the shift, the rules, candidate control.
template <typename scalar_t, typename T>
struct Scan {
  at::Tensor q, s, center, qn, sn;  // qn / sn: squared norms of the centred rows
  const int64_t* self = nullptr;
  int64_t kk = 0, offset = 0;
  std::vector<Filter> chain;
  Rule<T> rule[kNumFilters];
  int64_t tried[kNumFilters] = {};
  int64_t failed[kNumFilters] = {};
  at::Tensor counters;  // [4] uint64 on the device: canonical keys; probe passes, expected, pairs
  cudaStream_t stream;

  size_t start() const {
    return chain_start(chain, tried, failed);
  }
};

// Whether format f lets more than the fallback budget of pairs through on the first rows of
// this (query block, tile), whose cross terms in f are in `dot` (one device sync).
template <typename scalar_t, typename T>
bool too_loose(Scan<scalar_t, T>& sc, Filter f, const T* dot, int64_t m0, int64_t mb,
               int64_t n0, int64_t nb, const T* td) {
  const Rule<T>& r = sc.rule[int(f)];
  if (!r.finite) {
    return true;
  }
  unsigned long long* out =
      reinterpret_cast<unsigned long long*>(sc.counters.template mutable_data_ptr<int64_t>()) + 1;
  C10_CUDA_CHECK(cudaMemsetAsync(out, 0, 3 * sizeof(unsigned long long), sc.stream));
  const int rows = static_cast<int>(std::min<int64_t>(mb, kProbeRows));
  probe_kernel<T><<<rows, kThreads, 0, sc.stream>>>(dot, nb,
      sc.qn.template const_data_ptr<T>() + m0, sc.sn.template const_data_ptr<T>() + n0,
      sc.offset + n0, sc.self != nullptr ? sc.self + m0 : nullptr, td, static_cast<int>(sc.kk),
      r.keep, r.up, r.grow, r.slack, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor got = sc.counters.narrow(0, 1, 3).cpu();
  const auto* v = got.template const_data_ptr<int64_t>();
  return static_cast<double>(v[0] - v[1]) > cpu::fallback_budget() * static_cast<double>(v[2]);
}

// Rows per query block and per support tile: the cross-term tile bounded by kTileElems, the
// rows converted to the chain's formats by kConvBytes each.
struct Blocks {
  int64_t qb, tile;
  bool whole_support;  // the support converted once per format (kWholeSupportBytes)
};

Blocks block_sizes(const std::vector<Filter>& chain, at::ScalarType in, bool shifted,
                   int64_t m, int64_t n, int64_t d) {
  int64_t bytes = 0;
  for (const Filter f : chain) {
    bytes = std::max(bytes, cuda::gemm_rows_bytes(f, in, shifted));
  }
  const int64_t big = std::numeric_limits<int64_t>::max();
  const int64_t dd = std::max<int64_t>(d, 1);
  const int64_t conv_rows = bytes == 0 ? big : std::max(kMinRows, kConvBytes / (bytes * dd));
  const bool whole = bytes == 0 || n <= kWholeSupportBytes / (bytes * dd);
  const int64_t qb = std::max<int64_t>(1, std::min({m, kQueryBlock, conv_rows}));
  const int64_t tile = std::max<int64_t>(1, std::min({n, kTileElems / qb, whole ? big : conv_rows}));
  return {qb, tile, whole};
}

// Rows n0.. of rows converted as a whole (a view: same format and row stride).
cuda::GemmRows rows_from(const cuda::GemmRows& all, int64_t n0) {
  cuda::GemmRows out = all;
  out.ptr = static_cast<const char*>(all.ptr) + n0 * all.ld * at::elementSize(all.dtype);
  return out;
}

// Runs the tiles. `labels`/`pred` set: vote on the last tile (knn_vote).
template <typename scalar_t, typename T>
void knn_cuda_run(const char* op, const at::Tensor& q, const at::Tensor& s, const at::Tensor& self_index,
                  at::Tensor& top_d, at::Tensor& top_i, int64_t kk, int64_t skip,
                  int64_t offset, Filter filter, const at::Tensor& labels, at::Tensor* pred) {
  Scan<scalar_t, T> sc;
  sc.stream = at::cuda::getCurrentCUDAStream();
  const int64_t m = q.size(0);
  const int64_t n = s.size(0);
  const int64_t d = q.size(1);
  const at::Tensor qn_raw = row_sqnorms<scalar_t, T>(q, at::Tensor(), sc.stream);
  const at::Tensor sn_raw = row_sqnorms<scalar_t, T>(s, at::Tensor(), sc.stream);
  check_finite_rows(op, "queries", qn_raw);
  check_finite_rows(op, "support", sn_raw);
  const auto [qmax, smax] = check_distance_range(op, qn_raw, sn_raw);
  sc.q = q;
  sc.s = s;
  sc.center = shift_center<scalar_t, T>(q, qn_raw, sc.stream);
  sc.qn = sc.center.defined() ? row_sqnorms<scalar_t, T>(q, sc.center, sc.stream) : qn_raw;
  sc.sn = sc.center.defined() ? row_sqnorms<scalar_t, T>(s, sc.center, sc.stream) : sn_raw;
  sc.self = self_index.defined() ? self_index.const_data_ptr<int64_t>() : nullptr;
  sc.kk = kk;
  sc.offset = offset;
  sc.chain = fallback_chain(filter);
  for (int f = 0; f < kNumFilters; ++f) {
    sc.rule[f] = make_rule<T>(static_cast<Filter>(f), d, qmax, smax);
  }
  sc.counters = at::zeros({4}, q.options().dtype(at::kLong));
  unsigned long long* cand =
      reinterpret_cast<unsigned long long*>(sc.counters.template mutable_data_ptr<int64_t>());

  const Blocks bs = block_sizes(sc.chain, q.scalar_type(), sc.center.defined(), m, n, d);
  const int64_t qb = bs.qb;
  const int64_t tile = bs.tile;
  cuda::GemmRows s_all[kNumFilters];  // the whole support per format (bs.whole_support)
  bool s_made[kNumFilters] = {};
  at::Tensor dot = at::empty({qb * tile}, q.options().dtype(c10::CppTypeToScalarType<T>::value));
  T* dp = dot.mutable_data_ptr<T>();
  const size_t smem = static_cast<size_t>(kk + kRound) * (sizeof(T) + sizeof(int64_t));
  const int64_t* lab = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  int64_t stats[kNumStats] = {};

  for (int64_t m0 = 0; m0 < m; m0 += qb) {
    const int64_t mb = std::min(qb, m - m0);
    T* td = top_d.mutable_data_ptr<T>() + m0 * kk;
    int64_t* ti = top_i.mutable_data_ptr<int64_t>() + m0 * kk;
    const int64_t* sf = sc.self != nullptr ? sc.self + m0 : nullptr;
    cuda::GemmRows qrows[kNumFilters];  // this query block in each format, made on first use
    bool made[kNumFilters] = {};
    for (int64_t n0 = 0; n0 < n; n0 += tile) {
      const int64_t nb = std::min(tile, n - n0);
      const auto gemm = [&](Filter f) {
        if (!made[int(f)]) {
          qrows[int(f)] = cuda::gemm_rows(f, q, m0, mb, sc.center, false, sc.stream);
          made[int(f)] = true;
        }
        if (bs.whole_support && !s_made[int(f)]) {
          s_all[int(f)] = cuda::gemm_rows(f, s, 0, n, sc.center, true, sc.stream);
          s_made[int(f)] = true;
        }
        const cuda::GemmRows srows = bs.whole_support
            ? rows_from(s_all[int(f)], n0)
            : cuda::gemm_rows(f, s, n0, nb, sc.center, true, sc.stream);
        cuda::filter_gemm(f, qrows[int(f)], mb, srows, nb, d, dp, sc.stream);
      };
      // Candidate control (docs/design.md 6.5): the first format of the chain whose probe
      // passes; the last one (fp32) is never probed.
      Filter f = sc.chain.back();
      for (size_t l = sc.start(); l < sc.chain.size(); ++l) {
        f = sc.chain[l];
        gemm(f);
        if (l + 1 == sc.chain.size()) {
          break;
        }
        sc.tried[int(f)] += 1;
        if (!too_loose(sc, f, dp, m0, mb, n0, nb, td)) {
          break;
        }
        sc.failed[int(f)] += 1;
      }
      const Rule<T>& r = sc.rule[int(f)];
      const bool vote = pred != nullptr && n0 + nb >= n;
      auto kernel = vote ? select_tile_kernel<scalar_t, T, true>
                         : select_tile_kernel<scalar_t, T, false>;
      kernel<<<mb, kThreads, smem, sc.stream>>>(dp, nb, qp + m0 * d, sp + n0 * d, d,
          sc.qn.template const_data_ptr<T>() + m0, sc.sn.template const_data_ptr<T>() + n0,
          offset + n0, sf, td, ti, static_cast<int>(kk), static_cast<int>(skip),
          vote ? lab : nullptr, vote ? pred->mutable_data_ptr<int64_t>() + m0 : nullptr,
          r.keep, r.grow, r.slack, cand);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats[kStatTiles] += 1;
      stats[kStatFallbacks] += f != sc.chain[0] ? 1 : 0;
      stats[pairs_stat(f)] += mb * nb;
      stats[kStatPairs] += mb * nb;
    }
  }
  stats[kStatCandidates] = sc.counters[0].template item<int64_t>();
  stats_add(kStatCalls, 1);
  for (int st = 1; st < kNumStats; ++st) {
    stats_add(static_cast<Stat>(st), stats[st]);
  }
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

// Tests only: the math mode of torch's cuBLAS handle on the current device and stream (the
// filter must never change it: it uses its own cuBLASLt handle).
int64_t torch_cublas_math_mode() {
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
  TORCH_CUDABLAS_CHECK(cublasGetMathMode(at::cuda::getCurrentCUDABlasHandle(), &mode));
  return static_cast<int64_t>(mode);
}

} // namespace
} // namespace pdepth

TORCH_LIBRARY(pdepth_testing, m) {
  m.def("torch_cublas_math_mode() -> int", &pdepth::torch_cublas_math_mode);
}

TORCH_LIBRARY_IMPL(pdepth, CUDA, m) {
  m.impl("knn", &pdepth::knn_cuda);
  m.impl("knn_vote", &pdepth::knn_vote_cuda);
  m.impl("vote", &pdepth::vote_cuda);
}
