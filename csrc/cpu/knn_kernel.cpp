// CPU kernels of the pdepth ops: the cross terms from a GEMM in the filter's format
// (filter_gemm.h), then a fused scan that filters them against each query's running k-th
// best and ranks the few candidates by their canonical key (knn.h) in a max-heap whose root
// is the k-th best. Parallel over query blocks; the output depends neither on the thread
// count, on how the support set is chunked, nor on the filter format.
#include "../knn.h"
#include "filter_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

namespace pdepth {
namespace {

// Fixed tile sizes (never derived from the thread count). A [kQueryBlock x kSupportTile]
// float32 tile of cross terms is 512 KiB: it stays in L2 between the GEMM and the scan.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kSupportTile = 1024;
// From this dimension on, canonical keys are computed support row by support row in pieces
// of kKeyPiece (batched_keys): a candidate-by-candidate scan would read a support row from
// memory for every candidate.
constexpr int64_t kBatchKeysD = 2048;
// From this dimension on the scan takes two passes per chunk of queries (wide_scan): the
// cross terms against the whole support set first, each query's threshold from all of them,
// then the canonical keys. A 1024-row support tile no longer fits in the caches there, so
// the tile-by-tile scan loses its locality (measured on the 2-core EPYC, N = 20,000: the
// tile path is faster at D = 4096, the two passes 1.9x faster at D = 8192).
constexpr int64_t kTwoPassD = 8192;
// ... or from kBatchKeysD on when the support set is at most this size: it stays in the
// last-level cache, so the canonical keys lose nothing (paper widths, N = 2,000, D = 2048:
// two passes 0.76x the torch pipeline's time, the tile path 1.06x).
constexpr int64_t kCachedSupportBytes = int64_t(16) << 20;
// Columns per piece of a batched key: longer pieces mean fewer, longer streams per pair (an
// 8 KiB piece of each row); measured on the 2-core EPYC (AVX2), fp32, ReLU rows, Q = 1,000,
// N = 3,000: the keys 0.55-0.7x the time of 512-column pieces at D = 4096-50,176.
constexpr int64_t kKeyPiece = 2048;
// Queries per key block on the tile path (their pieces and accumulators stay in L2 while the
// tile's rows come from L3); the two passes take one block per thread (rows from memory).
constexpr int64_t kKeyRows = 64;
// The wide path's cross terms of one query chunk against the whole support set: at most this
// many bytes unless that leaves fewer than kMinChunk queries (then kMinChunk x N, which for
// D >= kTwoPassD is at most 1/32 of the support's own size).
constexpr int64_t kChunkBytes = int64_t(64) << 20;
constexpr int64_t kMinChunk = 256;
// Largest query piece of one centred_dot call (its scratch stays in L2 / L3).
constexpr int64_t kPieceRows = 512;
// The scan tests this many keys against the threshold at once (vectorised); only groups
// holding a candidate take the scalar heap path.
constexpr int64_t kScanWidth = 16;
// The fallback decision counts the candidates of a block's first kProbeRows rows (on wide
// rows: against the first kProbeSupport support rows).
constexpr int64_t kProbeRows = 32;
constexpr int64_t kProbeSupport = 256;
constexpr double kWideBudgetShare = 0.5;
// The rows are shifted by the queries' mean when its squared norm exceeds 1/kShiftShare of
// the queries' mean squared norm (the shift then tightens the margin by more than that share).
constexpr double kShiftShare = 16.0;
// From this dimension on, the GEMM is multithreaded over [kWideQueryBlock x kSupportTile]
// (a 32 MiB float32 buffer at most) instead of per-thread [kQueryBlock x kSupportTile].
constexpr int64_t kWideD = 256;
constexpr int64_t kWideQueryBlock = 8192;

template <typename T>
struct Entry {
  T d;
  int64_t i;
};

template <typename T>
inline bool entry_less(const Entry<T>& a, const Entry<T>& b) {
  return knn_less(a.d, a.i, b.d, b.i);
}

// The running top-kk of `rows` rows: each a max-heap of its `prev` row (pd, pi [rows, kk])
// when given, else kk empty slots (+inf, -1). Shared by the general and the symmetric scan.
template <typename T>
std::vector<Entry<T>> start_heaps(int64_t rows, int64_t kk, const T* pd, const int64_t* pi) {
  std::vector<Entry<T>> heaps(rows * kk);
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Entry<T>* h = heaps.data() + r * kk;
      if (pd != nullptr) {
        for (int64_t j = 0; j < kk; ++j) {
          h[j] = Entry<T>{pd[r * kk + j], pi[r * kk + j]};
        }
        std::make_heap(h, h + kk, entry_less<T>);
      } else {
        std::fill(h, h + kk, Entry<T>{std::numeric_limits<T>::infinity(), -1});
      }
    }
  });
  return heaps;
}

// Max-heap over entry_less: h[0] is the worst of the k kept. Replace it and sift down.
template <typename T>
inline void heap_replace_top(Entry<T>* h, int64_t k, Entry<T> e) {
  int64_t pos = 0;
  while (true) {
    int64_t child = 2 * pos + 1;
    if (child >= k) {
      break;
    }
    if (child + 1 < k && entry_less(h[child], h[child + 1])) {
      ++child;
    }
    if (!entry_less(e, h[child])) {
      break;
    }
    h[pos] = h[child];
    pos = child;
  }
  h[pos] = e;
}

template <typename T>
inline void offer(Entry<T>* h, int64_t k, T key, int64_t g) {
  if (knn_less(key, g, h[0].d, h[0].i)) {
    heap_replace_top(h, k, Entry<T>{key, g});
  }
}

// Compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks one clone per process
// (ifunc), so a machine always runs the same instructions. Out of line on purpose: every
// caller gets those same instructions, hence the same bits (knn.h).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDEPTH_CLONES __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PDEPTH_CLONES __attribute__((noinline))
#endif

// The canonical key (knn.h): sum_d (a_d - b_d)^2 as 16 running sums (sum t takes
// d = t mod 16, in order) and a fixed pairwise reduction. canonical_add feeds the running
// sums a piece [0, len) of the rows (len a multiple of 16 except for a row's last piece), so
// a key computed piece by piece (batched_keys) has the bits of one computed at once. One
// out-of-line function: every caller runs the same instructions (knn.h).
template <typename T>
__attribute__((always_inline)) inline void canonical_add_impl(
    T* __restrict__ acc, const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) {
    for (int t = 0; t < 16; ++t) {
      const T diff = a[j + t] - b[j + t];
      acc[t] += diff * diff;
    }
  }
  for (int t = 0; j < len; ++j, ++t) {
    const T diff = a[j] - b[j];
    acc[t] += diff * diff;
  }
}

PDEPTH_CLONES void canonical_add(float* acc, const float* a, const float* b, int64_t len) {
  canonical_add_impl(acc, a, b, len);
}
PDEPTH_CLONES void canonical_add(double* acc, const double* a, const double* b, int64_t len) {
  canonical_add_impl(acc, a, b, len);
}

template <typename T>
inline T canonical_finish(T* acc) {
  for (int w = 8; w >= 1; w /= 2) {
    for (int t = 0; t < w; ++t) {
      acc[t] += acc[t + w];
    }
  }
  return acc[0];
}

template <typename T>
inline T canonical_sqdist(const T* a, const T* b, int64_t d) {
  T acc[16] = {};
  canonical_add(acc, a, b, d);
  return canonical_finish(acc);
}

// The candidate rule of one filter format in the compute dtype (knn.h, docs/design.md 6).
template <typename T>
struct Rule {
  T keep;   // lower bound of the canonical key: (|a|^2 + |b|^2) * keep - 2 a.b
  T up;     // upper bound of |q - s|^2: (|a|^2 + |b|^2) * up - 2 a.b
  T grow;   // k-th best canonical key * grow + slack: the threshold for lower bounds
  T slack;
};

template <typename T>
Rule<T> make_rule(Filter f, int64_t d, double qmax, double smax) {
  const bool dbl = sizeof(T) == 8;
  const FilterMargin fm = filter_margin(f, d, dbl, at::kCPU);
  // The exhaustive test hook: an infinite slack makes every threshold infinite.
  const double slack = cpu::exhaustive() ? std::numeric_limits<double>::infinity()
                                         : filter_slack(d, dbl, qmax, smax);
  return Rule<T>{static_cast<T>(fm.keep), static_cast<T>(1.0 + fm.m),
      static_cast<T>(fm.grow), static_cast<T>(slack)};
}

template <typename T>
inline T row_threshold(const Entry<T>* h, const Rule<T>& rule, T seed) {
  return std::min(h[0].d * rule.grow + rule.slack, seed);
}

// One query against one support tile. `dot`, `qnorm`, `snorm` are the filter's cross terms
// and norms of the centred rows; a group of kScanWidth lower bounds is tested at once against
// the threshold (vectorised), and only candidates get their canonical key from the original
// rows `qrow`, `srows` and touch the heap `h` (size k). Returns the number of canonical keys.
template <typename T>
__attribute__((always_inline)) inline int64_t select_row_impl(
    const T* dot, int64_t nb, const T* qrow, const T* srows, int64_t d, T qnorm,
    const T* snorm, int64_t gbase, int64_t self, Entry<T>* h, int64_t k, const Rule<T>& rule,
    T seed) {
  T lower[kScanWidth];
  int64_t keys = 0;
  const auto consider = [&](int64_t j, T low) {
    const int64_t g = gbase + j;
    if (low <= row_threshold(h, rule, seed) && g != self) {
      ++keys;
      offer(h, k, canonical_sqdist(qrow, srows + j * d, d), g);
    }
  };
  int64_t j0 = 0;
  for (; j0 + kScanWidth <= nb; j0 += kScanWidth) {
    const T thr = row_threshold(h, rule, seed);
    for (int64_t t = 0; t < kScanWidth; ++t) {
      lower[t] = filter_bound(qnorm, snorm[j0 + t], dot[j0 + t], rule.keep);
    }
    int hits = 0;  // an integer count vectorises (a compare mask), a bool OR does not
    for (int64_t t = 0; t < kScanWidth; ++t) {
      hits += lower[t] <= thr ? 1 : 0;
    }
    if (hits != 0) {
      for (int64_t t = 0; t < kScanWidth; ++t) {
        consider(j0 + t, lower[t]);
      }
    }
  }
  for (; j0 < nb; ++j0) {
    consider(j0, filter_bound(qnorm, snorm[j0], dot[j0], rule.keep));
  }
  return keys;
}

// The scan is most of the CPU time at small D: give it the machine's vector width too.
PDEPTH_CLONES int64_t select_row(
    const float* dot, int64_t nb, const float* qrow, const float* srows, int64_t d,
    float qnorm, const float* snorm, int64_t gbase, int64_t self, Entry<float>* h, int64_t k,
    const Rule<float>& rule, float seed) {
  return select_row_impl(dot, nb, qrow, srows, d, qnorm, snorm, gbase, self, h, k, rule, seed);
}
PDEPTH_CLONES int64_t select_row(
    const double* dot, int64_t nb, const double* qrow, const double* srows, int64_t d,
    double qnorm, const double* snorm, int64_t gbase, int64_t self, Entry<double>* h,
    int64_t k, const Rule<double>& rule, double seed) {
  return select_row_impl(dot, nb, qrow, srows, d, qnorm, snorm, gbase, self, h, k, rule, seed);
}

// Pairs of one row whose lower bound passes `thr` (the fallback decision).
template <typename T>
int64_t count_candidates(const T* dot, int64_t nb, T qnorm, const T* snorm, T keep, T thr) {
  int64_t c = 0;
  for (int64_t j = 0; j < nb; ++j) {
    c += filter_bound(qnorm, snorm[j], dot[j], keep) <= thr ? 1 : 0;
  }
  return c;
}

// Appends to `out` the j < nb whose filter_bound(qnorm, snorm[j], dot[j], coef) <= thr: a
// group of kScanWidth bounds is tested at once (vectorised), only groups holding one take
// the scalar path.
template <typename T>
__attribute__((always_inline)) inline void list_below_impl(
    const T* dot, int64_t nb, T qnorm, const T* snorm, T coef, T thr,
    std::vector<int32_t>& out) {
  T b[kScanWidth];
  int64_t j0 = 0;
  for (; j0 + kScanWidth <= nb; j0 += kScanWidth) {
    int hits = 0;
    for (int64_t t = 0; t < kScanWidth; ++t) {
      b[t] = filter_bound(qnorm, snorm[j0 + t], dot[j0 + t], coef);
      hits += b[t] <= thr ? 1 : 0;
    }
    if (hits != 0) {
      for (int64_t t = 0; t < kScanWidth; ++t) {
        if (b[t] <= thr) {
          out.push_back(static_cast<int32_t>(j0 + t));
        }
      }
    }
  }
  for (; j0 < nb; ++j0) {
    if (filter_bound(qnorm, snorm[j0], dot[j0], coef) <= thr) {
      out.push_back(static_cast<int32_t>(j0));
    }
  }
}

PDEPTH_CLONES void list_below(const float* dot, int64_t nb, float qnorm, const float* snorm,
                              float coef, float thr, std::vector<int32_t>& out) {
  list_below_impl(dot, nb, qnorm, snorm, coef, thr, out);
}
PDEPTH_CLONES void list_below(const double* dot, int64_t nb, double qnorm,
                              const double* snorm, double coef, double thr,
                              std::vector<int32_t>& out) {
  list_below_impl(dot, nb, qnorm, snorm, coef, thr, out);
}

// The kk-th smallest upper bound of |q - s|^2 over these GEMM keys (self excluded), grown to
// bound the canonical key: it bounds the final k-th best, so no pair whose lower bound
// exceeds it can enter the top k. inf when there are fewer than kk usable pairs. The upper
// bounds are (qnorm + snorm) * up - 2 dot, i.e. filter_bound with coef `up`: the first pass
// lists those at most the kk-th of the first kk usable ones (a vectorised scan), then the
// kk-th smallest of that short list is the kk-th of all. `best`, when given, receives the
// columns of the kk smallest upper bounds (ties to the lower column), ascending: the pairs
// most likely to be the row's top k (wide_scan's first keys).
template <typename T>
using Uppers = std::vector<std::pair<T, int32_t>>;

template <typename T>
T kth_upper(const T* dot, int64_t nb, T qnorm, const T* snorm, int64_t gbase, int64_t self,
            int64_t kk, const Rule<T>& rule, Uppers<T>& scratch,
            std::vector<int32_t>* best = nullptr) {
  if (best != nullptr) {
    best->clear();
  }
  const bool has_self = self >= gbase && self < gbase + nb;
  if (nb - (has_self ? 1 : 0) < kk) {
    return std::numeric_limits<T>::infinity();
  }
  const auto upper = [&](int64_t j) { return filter_bound(qnorm, snorm[j], dot[j], rule.up); };
  // A first threshold: the largest of the first kk usable bounds is >= the kk-th overall.
  T first = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0, taken = 0; taken < kk; ++j) {
    if (gbase + j != self) {
      first = std::max(first, upper(j));
      ++taken;
    }
  }
  thread_local std::vector<int32_t> below;
  below.clear();
  list_below(dot, nb, qnorm, snorm, rule.up, first, below);
  scratch.clear();
  for (const int32_t j : below) {
    if (gbase + j != self) {
      scratch.emplace_back(upper(j), j);
    }
  }
  if (static_cast<int64_t>(scratch.size()) < kk) {
    // The listing's vectorised arithmetic may round a bound at `first` the other way (FMA
    // contraction): take every bound, any kk of which give a valid seed.
    scratch.clear();
    for (int64_t j = 0; j < nb; ++j) {
      if (gbase + j != self) {
        scratch.emplace_back(upper(j), static_cast<int32_t>(j));
      }
    }
  }
  std::nth_element(scratch.begin(), scratch.begin() + (kk - 1), scratch.end());
  if (best != nullptr) {
    for (int64_t t = 0; t < kk; ++t) {
      best->push_back(scratch[t].second);
    }
    std::sort(best->begin(), best->end());
  }
  return std::max(scratch[kk - 1].first, T(0)) * rule.grow + rule.slack;
}

// A row whose top-k is not full yet (root at inf) takes its threshold from this tile's GEMM
// keys (kth_upper), so the first tile does not compute a canonical key for every pair; inf
// for a full row (its root bounds better once the scan has run a while).
template <typename T>
T seed_threshold(const T* dot, int64_t nb, T qnorm, const T* snorm, int64_t gbase,
                 int64_t self, const Entry<T>* h, int64_t kk, const Rule<T>& rule,
                 Uppers<T>& scratch) {
  return h[0].d != std::numeric_limits<T>::infinity()
      ? std::numeric_limits<T>::infinity()
      : kth_upper(dot, nb, qnorm, snorm, gbase, self, kk, rule, scratch);
}

// Squared norm of one row, accumulated in double in 8 running sums (vectorised; the order
// only moves the norm within its bound, docs/design.md 6.2 step 4).
template <typename T>
inline T row_sqnorm(const T* row, int64_t d) {
  double acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int t = 0; t < 8; ++t) {
      acc[t] += static_cast<double>(row[j + t]) * static_cast<double>(row[j + t]);
    }
  }
  for (int t = 0; j < d; ++j, ++t) {
    acc[t] += static_cast<double>(row[j]) * static_cast<double>(row[j]);
  }
  return static_cast<T>(((acc[0] + acc[1]) + (acc[2] + acc[3])) +
      ((acc[4] + acc[5]) + (acc[6] + acc[7])));
}

template <typename T>
int64_t rows_grain(int64_t d) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1));
}

// Squared row norms [rows] of x [rows, D].
template <typename T>
at::Tensor row_sqnorms(const at::Tensor& x) {
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({x.size(0)}, x.options());
  const T* p = x.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, x.size(0), rows_grain<T>(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      o[r] = row_sqnorm(p + r * d, d);
    }
  });
  return out;
}

// Column means [D] (double) of x [rows, D], summed in double in place: q.sum(0, kDouble)
// would first cast the whole input to double on CPU, a working copy of twice its bytes
// (measured: a 0.93 GiB block peaked 1.87 GiB higher). Each thread sums a range of columns.
template <typename T>
at::Tensor column_means(const at::Tensor& x) {
  const int64_t rows = x.size(0);
  const int64_t d = x.size(1);
  at::Tensor out = at::zeros({d}, x.options().dtype(at::kDouble));
  const T* p = x.const_data_ptr<T>();
  double* o = out.mutable_data_ptr<double>();
  at::parallel_for(0, d, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = p + r * d;
      for (int64_t c = c0; c < c1; ++c) {
        o[c] += static_cast<double>(row[c]);
      }
    }
  });
  return out.div_(static_cast<double>(std::max<int64_t>(rows, 1)));
}

// centred = x - center (rounded) and its squared row norms, in one pass over x.
template <typename T>
void centre_rows(const at::Tensor& x, const at::Tensor& center, at::Tensor& centred,
                 at::Tensor& norms) {
  const int64_t rows = x.size(0);
  const int64_t d = x.size(1);
  if (!centred.defined() || centred.size(0) != rows) {
    centred = at::empty({rows, d}, x.options());
  }
  norms = at::empty({rows}, x.options());
  const T* p = x.const_data_ptr<T>();
  const T* c = center.const_data_ptr<T>();
  T* o = centred.mutable_data_ptr<T>();
  T* no = norms.mutable_data_ptr<T>();
  at::parallel_for(0, rows, rows_grain<T>(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* dst = o + r * d;
      const T* src = p + r * d;
      for (int64_t j = 0; j < d; ++j) {
        dst[j] = src[j] - c[j];
      }
      no[r] = row_sqnorm(dst, d);  // the row is still in cache
    }
  });
}

// The squared norms [rows] of the centred rows x - center (rounded as centre_rows rounds
// them, the same bits) without storing them: one read of x.
template <typename T>
at::Tensor centred_sqnorms(const at::Tensor& x, const at::Tensor& center) {
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({x.size(0)}, x.options());
  const T* p = x.const_data_ptr<T>();
  const T* c = center.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, x.size(0), rows_grain<T>(d), [&](int64_t r0, int64_t r1) {
    std::vector<T> row(d);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = 0; j < d; ++j) {
        row[j] = p[r * d + j] - c[j];
      }
      o[r] = row_sqnorm(row.data(), d);
    }
  });
  return out;
}

// One support tile: the centred rows, their squared norms, and the rows in each filter
// format, made on first use (a tile that never falls back is never converted to fp32's
// companion formats). Shared by the threads that scan it.
template <typename T>
struct Tile {
  at::Tensor centred;     // [nb, D] s - c
  at::Tensor norms;       // [nb] squared norms of the centred rows
  int64_t n0 = 0;
  int64_t nb = 0;
  cpu::FilterRows rows[kNumFilters];
  bool made[kNumFilters] = {};
  std::mutex lock;

  const cpu::FilterRows& in(Filter f) {
    const std::lock_guard<std::mutex> guard(lock);
    if (!made[int(f)]) {
      cpu::filter_rows(f, centred, true, rows[int(f)]);
      made[int(f)] = true;
    }
    return rows[int(f)];
  }
};

// Adds the wall-clock nanoseconds of its scope to a knn_stats counter (the time split);
// switch_to closes one phase and opens the next, stop closes it early.
class PhaseTimer {
 public:
  explicit PhaseTimer(std::atomic<int64_t>& counter) : to_(&counter), t0_(now()) {}
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;
  ~PhaseTimer() { stop(); }
  void switch_to(std::atomic<int64_t>& counter) {
    stop();
    to_ = &counter;
    t0_ = now();
  }
  void stop() {
    if (to_ != nullptr) {
      *to_ += std::chrono::duration_cast<std::chrono::nanoseconds>(now() - t0_).count();
      to_ = nullptr;
    }
  }

 private:
  static std::chrono::steady_clock::time_point now() { return std::chrono::steady_clock::now(); }
  std::atomic<int64_t>* to_;
  std::chrono::steady_clock::time_point t0_;
};

// Per-call state shared by every block: inputs, centred queries in each format, the rules,
// the formats to try in order (candidate control), the counters.
template <typename T>
struct Scan {
  std::vector<Filter> chain;  // the requested format, then more precise ones
  int64_t d, kk, offset;
  const T* qp;
  const T* sp;
  const T* qn;            // squared norms of the centred queries
  const int64_t* self;
  at::Tensor qc;          // centred queries
  cpu::FilterRows qrows[kNumFilters];
  std::once_flag made[kNumFilters];
  Rule<T> rule[kNumFilters];
  std::atomic<int64_t> tried[kNumFilters];
  std::atomic<int64_t> failed[kNumFilters];
  mutable std::atomic<int64_t> counts[kNumStats];

  const cpu::FilterRows& in(Filter f) {
    std::call_once(made[int(f)], [&] { cpu::filter_rows(f, qc, false, qrows[int(f)]); });
    return qrows[int(f)];
  }
  size_t start() const {
    return chain_start(chain, tried, failed);
  }
};

// The formats a requested filter falls back through, most precise last: bf16 -> bf16x3
// where three bfloat16 products beat one float32 product (AMX: 5-8x the float32 rate) ->
// fp32. With AVX512-BF16 alone (3-4x), bf16x3 only ties fp32, so bf16 falls back to fp32.
std::vector<Filter> fallback_chain(Filter f) {
  const bool fast = cpu::bf16_gemm() == cpu::Bf16Gemm::kMkl && cpu::has_amx_bf16();
  if (f == Filter::kBf16) {
    return fast ? std::vector<Filter>{Filter::kBf16, Filter::kBf16x3, Filter::kFp32}
                : std::vector<Filter>{Filter::kBf16, Filter::kFp32};
  }
  if (f == Filter::kBf16x3) {
    return {Filter::kBf16x3, Filter::kFp32};
  }
  return {Filter::kFp32};
}

// Canonical keys of the pairs (row i, column cand[i][t]), row i at a + i d and column j at
// b + j d (ncols columns), handed to emit(i, t, key) (the general scan offers them to the
// heaps, the symmetric one keeps them for both directions). Blocks of key_rows rows, each on
// one thread (so emit may touch row i's state), keys built piece by piece (kKeyPiece columns)
// column by column: each block's row pieces stay in L2 while each column row's piece is read
// once for all the block's pairs it takes part in (cache blocking: a key reads 8 D bytes for
// 3 D flops). canonical_add keeps every running sum's order, so the keys have
// canonical_sqdist's bits.
template <typename T, typename Emit>
void pair_keys(const T* a, const T* b, int64_t d, int64_t ncols,
               const std::vector<std::vector<int32_t>>& cand, int64_t key_rows, Emit&& emit) {
  const int64_t m = static_cast<int64_t>(cand.size());
  at::parallel_for(0, (m + key_rows - 1) / key_rows, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> row_off, col_off, entry_row, entry_pair, cursor;
    std::vector<T> acc;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * key_rows;
      const int64_t i1 = std::min(m, i0 + key_rows);
      row_off.assign(1, 0);
      col_off.assign(ncols + 1, 0);
      for (int64_t i = i0; i < i1; ++i) {
        row_off.push_back(row_off.back() + static_cast<int64_t>(cand[i].size()));
        for (const int32_t j : cand[i]) {
          ++col_off[j + 1];
        }
      }
      const int64_t pairs = row_off.back();
      if (pairs == 0) {
        continue;
      }
      for (int64_t j = 0; j < ncols; ++j) {
        col_off[j + 1] += col_off[j];
      }
      entry_row.resize(pairs);
      entry_pair.resize(pairs);
      cursor.assign(col_off.begin(), col_off.end() - 1);
      for (int64_t i = i0; i < i1; ++i) {
        for (size_t t = 0; t < cand[i].size(); ++t) {
          const int64_t e = cursor[cand[i][t]]++;
          entry_row[e] = i;
          entry_pair[e] = row_off[i - i0] + static_cast<int64_t>(t);
        }
      }
      acc.assign(pairs * 16, T(0));
      for (int64_t c0 = 0; c0 < d; c0 += kKeyPiece) {
        const int64_t w = std::min(kKeyPiece, d - c0);
        for (int64_t j = 0; j < ncols; ++j) {
          for (int64_t e = col_off[j]; e < col_off[j + 1]; ++e) {
            canonical_add(acc.data() + entry_pair[e] * 16, a + entry_row[e] * d + c0,
                          b + j * d + c0, w);
          }
        }
      }
      for (int64_t i = i0; i < i1; ++i) {
        for (size_t t = 0; t < cand[i].size(); ++t) {
          emit(i, t, canonical_finish(acc.data() + (row_off[i - i0] + int64_t(t)) * 16));
        }
      }
    }
  });
}

// The canonical keys of the pairs (query m0 + i, support n0 + cand[i][t]), offered to the
// heaps; returns their number.
template <typename T>
int64_t offer_keys(const Scan<T>& sc, int64_t n0, int64_t nb, int64_t m0,
                   const std::vector<std::vector<int32_t>>& cand, Entry<T>* hp,
                   int64_t key_rows) {
  int64_t keys = 0;
  for (const auto& c : cand) {
    keys += static_cast<int64_t>(c.size());
  }
  const int64_t gbase = sc.offset + n0;
  pair_keys(sc.qp + m0 * sc.d, sc.sp + n0 * sc.d, sc.d, nb, cand, key_rows,
            [&](int64_t i, size_t t, T key) {
              offer(hp + (m0 + i) * sc.kk, sc.kk, key, gbase + cand[i][t]);
            });
  return keys;
}

// The candidates of query rows m0..m0+mb against support rows n0..n0+nb (`dot` [mb x nb],
// `sn` their centred norms) at the rows' thresholds, their canonical keys computed for
// blocks of key_rows queries at a time (pair_keys), then offered to the heaps. With `first`
// (per row, ascending columns, self excluded) those pairs' keys go first: the rows'
// thresholds then come from their k-th best canonical key, not from the seed's upper bound,
// and the rest are listed under that (two stages: the keys a coarse format's window 2 m Q
// adds are mostly gone). Returns the number of keys.
template <typename T>
int64_t batched_keys(const Scan<T>& sc, int64_t n0, int64_t nb, const T* sn, int64_t m0,
                     int64_t mb, const T* dot, const std::vector<T>& seeds,
                     const Rule<T>& rule, Entry<T>* hp, int64_t key_rows,
                     const std::vector<std::vector<int32_t>>* first = nullptr) {
  const int64_t gbase = sc.offset + n0;
  int64_t keys = 0;
  PhaseTimer timer(sc.counts[kStatNsKeys]);
  if (first != nullptr) {
    keys += offer_keys(sc, n0, nb, m0, *first, hp, key_rows);
  }
  timer.switch_to(sc.counts[kStatNsSelect]);
  std::vector<std::vector<int32_t>> cand(mb);
  at::parallel_for(0, mb, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = m0 + i;
      const T thr = row_threshold(hp + r * sc.kk, rule, seeds[i]);
      const int64_t self = sc.self != nullptr ? sc.self[r] : -1;
      std::vector<int32_t>& c = cand[i];
      list_below(dot + i * nb, nb, sc.qn[r], sn, rule.keep, thr, c);
      const int32_t own = self >= gbase && self < gbase + nb ? int32_t(self - gbase) : -1;
      const std::vector<int32_t>* done = first != nullptr ? &(*first)[i] : nullptr;
      // Both lists ascend: drop self and the pairs keyed already (a pair offered twice would
      // take two places in the heap).
      size_t kept = 0, u = 0;
      for (const int32_t j : c) {
        while (done != nullptr && u < done->size() && (*done)[u] < j) {
          ++u;
        }
        if (j != own && !(done != nullptr && u < done->size() && (*done)[u] == j)) {
          c[kept++] = j;
        }
      }
      c.resize(kept);
    }
  });
  timer.switch_to(sc.counts[kStatNsKeys]);
  return keys + offer_keys(sc, n0, nb, m0, cand, hp, key_rows);
}

// The counters of one block of mb queries x nb support rows (`tiles` support tiles).
template <typename T>
void count_block(Scan<T>& sc, Filter f, const std::vector<T>& seeds, int64_t keys,
                 int64_t mb, int64_t nb, int64_t tiles) {
  int64_t seeded = 0;
  for (int64_t i = 0; i < mb; ++i) {
    seeded += seeds[i] != std::numeric_limits<T>::infinity() ? 1 : 0;
  }
  if (f != sc.chain[0]) {
    sc.counts[kStatFallbacks] += tiles;
  }
  sc.counts[kStatCandidates] += keys;
  sc.counts[kStatSeeded] += seeded;
  sc.counts[kStatTiles] += tiles;
  sc.counts[pairs_stat(f)] += mb * nb;
  sc.counts[kStatPairs] += mb * nb;
}

// Whether more than `budget` of the pairs of rows m0..m0+rows pass their thresholds in
// format f beyond the `expected` per row, with `dot` their cross terms (row stride nb)
// against support rows of norms `sn` and `seeds` their seeds.
template <typename T>
bool too_loose(const Scan<T>& sc, Filter f, int64_t m0, int64_t rows, int64_t nb,
               const T* dot, const T* sn, const T* seeds, const Entry<T>* hp,
               int64_t expected, double budget) {
  const PhaseTimer timer(sc.counts[kStatNsSelect]);
  std::atomic<int64_t> total{0};
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    int64_t c = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = m0 + i;
      c += count_candidates(dot + i * nb, nb, sc.qn[r], sn, sc.rule[int(f)].keep,
          row_threshold(hp + r * sc.kk, sc.rule[int(f)], seeds[i]));
    }
    total += c;
  });
  return static_cast<double>(total.load() - rows * expected) >
      budget * static_cast<double>(rows * nb);
}

// The format a block of mb query rows is filtered in: the first of the chain (from the one
// most blocks accepted so far) whose probe passes, a format that lets more than the budget of
// pairs through being replaced by the next, more precise one (candidate control, counted).
// `probe(f)` returns -1 when f is too loose, else the number of the block's first rows it
// computed in f; `compute(f, r0, r1)` computes rows r0..r1 (cross terms and seeds).
template <typename T, typename Probe, typename Compute>
Filter pick_format(Scan<T>& sc, int64_t mb, const Probe& probe, const Compute& compute) {
  for (size_t l = sc.start();; ++l) {
    const Filter f = sc.chain[l];
    if (l + 1 == sc.chain.size()) {
      compute(f, 0, mb);
      return f;
    }
    sc.tried[int(f)] += 1;
    const int64_t done = probe(f);
    if (done < 0) {
      sc.failed[int(f)] += 1;
      continue;
    }
    if (done < mb) {
      compute(f, done, mb);  // the rest of the block, in the format the probe accepted
    }
    return f;
  }
}

// Filters and ranks rows m0..m0+mb of one tile into the heaps `hp` (indexed by query), with
// `dot` a buffer of mb * nb.
template <typename T>
void process_block(Scan<T>& sc, Tile<T>& tile, int64_t m0, int64_t mb, T* dot,
                   Entry<T>* hp) {
  const int64_t nb = tile.nb;
  const int64_t gbase = sc.offset + tile.n0;
  const T* sn = tile.norms.template const_data_ptr<T>();
  std::vector<T> seeds(mb);
  // Cross terms and seeds of the block's rows r0..r1 in format f.
  const auto compute = [&](Filter f, int64_t r0, int64_t r1) {
    {
      const PhaseTimer timer(sc.counts[kStatNsGemm]);
      cpu::filter_dot(f, sc.in(f), m0 + r0, r1 - r0, tile.in(f), dot + r0 * nb);
    }
    const PhaseTimer timer(sc.counts[kStatNsSeeds]);
    at::parallel_for(r0, r1, 64, [&](int64_t i0, int64_t i1) {
      Uppers<T> scratch;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = m0 + i;
        seeds[i] = seed_threshold(dot + i * nb, nb, sc.qn[r], sn, gbase,
            sc.self != nullptr ? sc.self[r] : -1, hp + r * sc.kk, sc.kk, sc.rule[int(f)],
            scratch);
      }
    });
  };
  // A large block tries a format on its first kProbeRows rows before paying for all of them.
  const int64_t probe = mb >= 4 * kProbeRows ? kProbeRows : mb;
  const Filter f = pick_format(sc, mb,
      [&](Filter f) -> int64_t {
        compute(f, 0, probe);
        return too_loose(sc, f, m0, probe, nb, dot, sn, seeds.data(), hp, 0,
                   cpu::fallback_budget()) ? -1 : probe;
      },
      compute);
  if (sc.d >= kBatchKeysD) {
    const int64_t keys =
        batched_keys(sc, tile.n0, nb, sn, m0, mb, dot, seeds, sc.rule[int(f)], hp, kKeyRows);
    count_block(sc, f, seeds, keys, mb, nb, 1);
    return;
  }
  std::atomic<int64_t> keys{0};
  const PhaseTimer timer(sc.counts[kStatNsKeys]);
  at::parallel_for(0, mb, 16, [&](int64_t i0, int64_t i1) {
    int64_t c = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = m0 + i;
      c += select_row(dot + i * nb, nb, sc.qp + r * sc.d, sc.sp + tile.n0 * sc.d, sc.d,
          sc.qn[r], sn, gbase, sc.self != nullptr ? sc.self[r] : -1, hp + r * sc.kk, sc.kk,
          sc.rule[int(f)], seeds[i]);
    }
    keys += c;
  });
  count_block(sc, f, seeds, keys.load(), mb, nb, 1);
}

// Whether format f lets too many pairs through on wide rows, estimated cheaply: `rows` of
// the chunk's queries against the first kProbeSupport support rows, each with the threshold
// of the matching quantile (the ceil(kk S / n)-th of S rows stands for the kk-th of n), the
// pairs past that quantile against kWideBudgetShare of the budget (a wide row's canonical
// key reads a support row from memory: it costs more GEMM pairs than a narrow one). An
// estimate for the choice of format only; the scan's thresholds stay rigorous.
template <typename T>
bool probe_too_loose(const Scan<T>& sc, Filter f, const T* center, int64_t m0, int64_t rows,
                     int64_t n, const T* sn, const Entry<T>* hp) {
  const int64_t ns = std::min(kProbeSupport, n);
  const int64_t kk = std::max<int64_t>(1, (sc.kk * ns + n - 1) / n);
  std::vector<T> dot(rows * ns);
  std::vector<T> seeds(rows);
  Uppers<T> scratch;
  // Split over the support sample, one piece per thread.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t piece = (ns + threads - 1) / threads;
  PhaseTimer timer(sc.counts[kStatNsGemm]);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    thread_local cpu::CentredScratch<T> work;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = std::min(ns, t * piece);
      const int64_t nj = std::min(ns, j0 + piece) - j0;
      if (nj > 0) {
        cpu::centred_dot(f, sc.qp + m0 * sc.d, rows, sc.sp + j0 * sc.d, nj, center, sc.d,
            dot.data() + j0, ns, work);
      }
    }
  });
  timer.switch_to(sc.counts[kStatNsSeeds]);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = m0 + i;
    seeds[i] = kth_upper(dot.data() + i * ns, ns, sc.qn[r], sn, sc.offset,
        sc.self != nullptr ? sc.self[r] : -1, kk, sc.rule[int(f)], scratch);
  }
  timer.stop();
  return too_loose(sc, f, m0, rows, ns, dot.data(), sn, seeds.data(), hp, kk,
      cpu::fallback_budget() * kWideBudgetShare);
}

// The center the filter GEMM shifts the rows by (x's column means, in x's dtype), or an
// undefined tensor for no shift. The shift pays only when the mean carries a fair share of
// the rows' norms (ReLU features), and only for the coarse formats: fp32's (and float64's)
// margin is about 1e-4 of |a|^2 + |b|^2 at any D (reductions in blocks of kReduceBlock), far
// below the k-th distances of real data, so where fp32 is the only format and the GEMM reads
// the rows in place (`in_place`: the two-pass and the symmetric paths) the shift would only
// cost the centring of every block and two passes over the rows. `norms`: x's raw squared
// row norms. The output never depends on the shift (it moves only the filter's bounds).
template <typename T>
at::Tensor shift_center(const std::vector<Filter>& chain, bool in_place, const at::Tensor& x,
                        const at::Tensor& norms) {
  if (in_place && chain.size() == 1 && chain[0] == Filter::kFp32) {
    return at::Tensor();
  }
  const at::Tensor mean = column_means<T>(x);
  const bool pays = mean.dot(mean).item<double>() * kShiftShare >
      norms.sum(0, false, at::kDouble).item<double>() / static_cast<double>(x.size(0));
  return pays ? mean.to(x.scalar_type()) : at::Tensor();
}

// Wide rows (D >= kTwoPassD), query chunk by query chunk: (1) the cross terms of the chunk
// against all n support rows, in pieces of <= kPieceRows queries x kSupportTile support rows,
// one per thread, each centred and converted block by block in the cache (centred_dot)
// rather than from centred copies of the inputs; (2) each query's threshold from the kk-th
// smallest upper bound over all n (kth_upper), not over one tile; (3) canonical keys for the
// kk pairs of smallest upper bound, then for the other pairs under the threshold those keys
// give (batched_keys' two stages, docs/design.md 6.5). `sn` [n] are the centred support norms.
template <typename T>
void wide_scan(Scan<T>& sc, const T* center, int64_t m, int64_t n, const T* sn,
               Entry<T>* hp) {
  const int64_t chunk = cpu::wide_chunk_rows() > 0
      ? std::min(m, cpu::wide_chunk_rows())
      : std::min(m, std::max<int64_t>(
            kMinChunk, kChunkBytes / (n * static_cast<int64_t>(sizeof(T)))));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ntiles = (n + kSupportTile - 1) / kSupportTile;
  std::vector<T> dot(chunk * n);
  std::vector<T> seeds(chunk);
  std::vector<std::vector<int32_t>> first(chunk);  // each row's kk smallest upper bounds
  for (int64_t m0 = 0; m0 < m; m0 += chunk) {
    const int64_t mb = std::min(chunk, m - m0);
    const Filter f = pick_format(sc, mb,
        [&](Filter f) -> int64_t {
          return probe_too_loose(sc, f, center, m0, std::min(kProbeRows, mb), n, sn, hp)
              ? -1 : 0;
        },
        [&](Filter f, int64_t r0, int64_t r1) {
          // Enough pieces for every thread: smaller query pieces when the support is short.
          int64_t piece = std::min(kPieceRows, r1 - r0);
          while (piece > 16 && ((r1 - r0 + piece - 1) / piece) * ntiles < threads) {
            piece = (piece + 1) / 2;
          }
          const int64_t npieces = (r1 - r0 + piece - 1) / piece;
          PhaseTimer timer(sc.counts[kStatNsGemm]);
          // The bf16 formats convert each side once per chunk where that splits well.
          const bool low = cpu::low_chunk_dot(f, sc.qp + (m0 + r0) * sc.d, r1 - r0, sc.sp, n,
              center, sc.d, dot.data() + r0 * n, n);
          at::parallel_for(0, low ? 0 : npieces * ntiles, 1, [&](int64_t w0, int64_t w1) {
            thread_local cpu::CentredScratch<T> scratch;  // kept: no page faults per chunk
            for (int64_t w = w0; w < w1; ++w) {
              const int64_t i0 = r0 + (w / ntiles) * piece;
              const int64_t j0 = (w % ntiles) * kSupportTile;
              cpu::centred_dot(f, sc.qp + (m0 + i0) * sc.d, std::min(piece, r1 - i0),
                  sc.sp + j0 * sc.d, std::min(kSupportTile, n - j0), center, sc.d,
                  dot.data() + i0 * n + j0, n, scratch);
            }
          });
          timer.switch_to(sc.counts[kStatNsSeeds]);
          at::parallel_for(r0, r1, 16, [&](int64_t i0, int64_t i1) {
            Uppers<T> scratch;
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t r = m0 + i;
              seeds[i] = kth_upper(dot.data() + i * n, n, sc.qn[r], sn, sc.offset,
                  sc.self != nullptr ? sc.self[r] : -1, sc.kk, sc.rule[int(f)], scratch,
                  &first[i]);
            }
          });
        });
    // One key block per thread: each support row is read from memory once per thread.
    first.resize(mb);
    const int64_t keys = batched_keys(sc, 0, n, sn, m0, mb, dot.data(), seeds,
        sc.rule[int(f)], hp, std::max(kKeyRows, (mb + threads - 1) / threads), &first);
    count_block(sc, f, seeds, keys, mb, n, ntiles);
  }
}

// Narrow rows (D < kTwoPassD), support tile by support tile: each tile centred once and
// shared by the query blocks, each row's heap tightening as the tiles go by.
template <typename T>
void narrow_scan(Scan<T>& sc, const at::Tensor& s, const at::Tensor& center, int64_t m,
                 int64_t n, Entry<T>* hp) {
  // Small D: per-thread GEMMs of [qblock x tile] whose output stays in cache (blocks small
  // enough to give every thread work). Large D: the GEMM dominates, so one multithreaded
  // GEMM per (query super-block, tile) lets the BLAS pack each support tile once; the scan
  // then runs in parallel over queries. The output depends on neither choice.
  const int64_t kk = sc.kk;
  const bool wide = sc.d >= kWideD;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t qblock = wide
      ? std::min<int64_t>(m, kWideQueryBlock)
      : std::clamp<int64_t>((m + threads - 1) / threads, 16, kQueryBlock);
  const int64_t nblocks = (m + qblock - 1) / qblock;
  // A support tile shifted by the center and its squared norms (finite: the range rule of
  // check_distance_range bounds them).
  const auto make_tile = [&](Tile<T>& t, int64_t n0, int64_t nb) {
    const PhaseTimer timer(sc.counts[kStatNsNorms]);
    centre_rows<T>(s.narrow(0, n0, nb), center, t.centred, t.norms);
    std::fill(std::begin(t.made), std::end(t.made), false);
    t.n0 = n0;
    t.nb = nb;
  };
  const int64_t tile_rows = kSupportTile;
  const int64_t ntiles = (n + tile_rows - 1) / tile_rows;
  const bool split_support = nblocks < threads && ntiles > 1;
  if (split_support) {
    // Too few queries to give every thread a block: split the support tiles over the
    // threads instead, each with its own heaps, then merge them. Exact (canonical keys,
    // distinct indices), so the merge order does not matter.
    std::mutex merge;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Entry<T>> local(m * kk, Entry<T>{std::numeric_limits<T>::infinity(), -1});
      std::vector<T> dot(m * tile_rows);
      Tile<T> tile;  // reused tile after tile
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * tile_rows;
        make_tile(tile, n0, std::min(tile_rows, n - n0));
        process_block(sc, tile, 0, m, dot.data(), local.data());
      }
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t e = 0; e < m * kk; ++e) {
        if (local[e].i >= 0) {
          offer(hp + (e / kk) * kk, kk, local[e].d, local[e].i);
        }
      }
    });
  } else {
    std::vector<T> wide_dot(wide ? qblock * std::min(tile_rows, n) : 0);
    Tile<T> tile;  // reused tile after tile
    for (int64_t n0 = 0; n0 < n; n0 += tile_rows) {
      make_tile(tile, n0, std::min(tile_rows, n - n0));
      if (wide) {
        for (int64_t m0 = 0; m0 < m; m0 += qblock) {
          process_block(sc, tile, m0, std::min(qblock, m - m0), wide_dot.data(), hp);
        }
        continue;
      }
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> dot(qblock * tile.nb);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * qblock;
          process_block(sc, tile, m0, std::min(qblock, m - m0), dot.data(), hp);
        }
      });
    }
  }
}

// The GEMM sees rows shifted by the queries' mean, so its error (and the filter margin)
// scales with the spread of the data rather than its distance from the origin (ReLU features
// sit far from it). The center depends on the queries only: every streamed chunk is shifted
// by the same vector.
template <typename T>
void knn_cpu_impl(
    const at::Tensor& q, const at::Tensor& s, const at::Tensor& self_index,
    const at::Tensor& prev_dist, const at::Tensor& prev_index, int64_t kk, int64_t skip,
    int64_t offset, Filter filter, const at::Tensor& qn, const at::Tensor& sn, double qmax,
    double smax, at::Tensor& out_dist, at::Tensor& out_index) {
  const int64_t m = q.size(0);
  const int64_t n = s.size(0);
  const int64_t k = kk - skip;
  const int64_t d = q.size(1);
  const T* pd = prev_dist.defined() ? prev_dist.const_data_ptr<T>() : nullptr;
  const int64_t* pi = prev_index.defined() ? prev_index.const_data_ptr<int64_t>() : nullptr;
  T* od = out_dist.mutable_data_ptr<T>();
  int64_t* oi = out_index.mutable_data_ptr<int64_t>();

  // Unshifted rows (shift_center) keep the same, then conservative, margin: a zero center on
  // the tile path, no shift at all on the two-pass path.
  std::atomic<int64_t> norms_ns{0};
  PhaseTimer timer(norms_ns);
  // Wide rows are centred block by block inside the GEMM (wide_scan); only their norms here.
  // The two passes also pay from kBatchKeysD on when the whole support fits in the cache.
  const bool two_pass = d >= kTwoPassD ||
      (d >= kBatchKeysD && n * d * static_cast<int64_t>(sizeof(T)) <= kCachedSupportBytes);
  const std::vector<Filter> chain = fallback_chain(filter);
  const at::Tensor shifted = shift_center<T>(chain, two_pass, q, qn);
  const bool shift = shifted.defined();
  const at::Tensor center = shift ? shifted : at::zeros({d}, q.options());
  at::Tensor qc, qcn;
  if (two_pass) {
    qcn = shift ? centred_sqnorms<T>(q, center) : qn;
  } else {
    centre_rows<T>(q, center, qc, qcn);
  }
  timer.stop();
  Scan<T> sc;
  sc.chain = chain;
  sc.qc = qc;
  sc.d = d;
  sc.kk = kk;
  sc.offset = offset;
  sc.qp = q.const_data_ptr<T>();
  sc.sp = s.const_data_ptr<T>();
  sc.qn = qcn.const_data_ptr<T>();
  sc.self = self_index.defined() ? self_index.const_data_ptr<int64_t>() : nullptr;
  for (int f = 0; f < kNumFilters; ++f) {
    sc.rule[f] = make_rule<T>(static_cast<Filter>(f), d, qmax, smax);
    sc.tried[f] = 0;
    sc.failed[f] = 0;
  }
  for (auto& c : sc.counts) {
    c = 0;
  }
  sc.counts[kStatNsNorms] += norms_ns.load();

  std::vector<Entry<T>> heaps = start_heaps(m, kk, pd, pi);

  if (two_pass) {
    timer.switch_to(sc.counts[kStatNsNorms]);
    // Queries that are the support rows share their norms (knn_cpu_checked): so do the centred.
    const at::Tensor scn = !shift ? sn : sn.is_same(qn) ? qcn : centred_sqnorms<T>(s, center);
    timer.stop();
    wide_scan(sc, shift ? center.const_data_ptr<T>() : nullptr, m, n,
        scn.const_data_ptr<T>(), heaps.data());
  } else {
    narrow_scan(sc, s, center, m, n, heaps.data());
  }
  timer.switch_to(sc.counts[kStatNsSelect]);

  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      Entry<T>* h = heaps.data() + r * kk;
      std::sort_heap(h, h + kk, entry_less<T>);
      for (int64_t j = 0; j < k; ++j) {
        od[r * k + j] = h[skip + j].d;
        oi[r * k + j] = h[skip + j].i;
      }
    }
  });
  timer.stop();
  stats_add(kStatCalls, 1);
  for (int st = 1; st < kNumStats; ++st) {
    stats_add(static_cast<Stat>(st), sc.counts[st].load());
  }
}

// knn on checked arguments (kk = k + skip neighbours kept per query).
std::tuple<at::Tensor, at::Tensor> knn_cpu_checked(
    const char* op, const at::Tensor& queries, const at::Tensor& support, int64_t kk,
    int64_t skip, const c10::optional<at::Tensor>& self_index,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset, c10::string_view filter_arg) {
  const Filter filter = resolve_filter(
      op, filter_arg, at::kCPU, queries.scalar_type(), queries.size(1));
  const auto compute = knn_compute_dtype(queries.scalar_type());
  const int64_t m = queries.size(0);
  const int64_t k = kk - skip;
  at::Tensor out_dist = at::empty({m, k}, queries.options().dtype(compute));
  at::Tensor out_index = at::empty({m, k}, queries.options().dtype(at::kLong));
  if (m == 0) {
    return {out_dist, out_index};
  }
  // float16 / bfloat16 are widened once; float32 / float64 contiguous inputs are used as is.
  const at::Tensor q = queries.to(compute).contiguous();
  const at::Tensor s = support.to(compute).contiguous();
  const at::Tensor si = self_index_or_empty(self_index);
  const at::Tensor pd = prev_dist.has_value() ? prev_dist->contiguous() : at::Tensor();
  const at::Tensor pi = prev_index.has_value() ? prev_index->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(compute, "knn_cpu", [&] {
    const auto t0 = std::chrono::steady_clock::now();
    // Queries that are the support rows (the training split scored against itself): one
    // pass for both norms (the same function of the same rows: the same bits).
    const bool same = q.data_ptr() == s.data_ptr() && q.sizes() == s.sizes();
    const at::Tensor qn = row_sqnorms<scalar_t>(q);
    const at::Tensor sn = same ? qn : row_sqnorms<scalar_t>(s);
    check_finite_rows(op, "queries", qn);
    check_finite_rows(op, "support", sn);
    const auto [qmax, smax] = check_distance_range(op, qn, sn);
    stats_add(kStatNsNorms, std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - t0).count());
    knn_cpu_impl<scalar_t>(q, s, si, pd, pi, kk, skip, offset, filter, qn, sn, qmax, smax,
        out_dist, out_index);
  });
  return {out_dist, out_index};
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(
    const at::Tensor& queries, const at::Tensor& support, int64_t k,
    const c10::optional<at::Tensor>& self_index, int64_t skip,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset, c10::string_view filter) {
  const int64_t kk = check_knn_args(
      "knn", queries, support, k, self_index, skip, prev_dist, prev_index, offset);
  return knn_cpu_checked(
      "knn", queries, support, kk, skip, self_index, prev_dist, prev_index, offset, filter);
}

// vote on checked labels (knn_vote's labels are checked once, on the support side).
at::Tensor vote_cpu_checked(const at::Tensor& neighbor_labels, int64_t num_classes) {
  const at::Tensor nl = neighbor_labels.contiguous();
  const int64_t m = nl.size(0);
  const int64_t k = nl.size(1);
  at::Tensor pred = at::empty({m}, nl.options());
  const int64_t* lp = nl.const_data_ptr<int64_t>();
  int64_t* pp = pred.mutable_data_ptr<int64_t>();
  at::parallel_for(0, m, 1024, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> counts(num_classes, 0);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* row = lp + r * k;
      int64_t best = -1;  // stays -1 when every slot is empty
      int64_t best_count = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (row[j] < 0) {
          continue;  // an empty slot (-1) does not vote
        }
        const int64_t c = ++counts[row[j]];
        // Largest count wins; among equal counts the lowest class id.
        if (c > best_count || (c == best_count && row[j] < best)) {
          best = row[j];
          best_count = c;
        }
      }
      pp[r] = best;
      for (int64_t j = 0; j < k; ++j) {
        if (row[j] >= 0) {
          counts[row[j]] = 0;
        }
      }
    }
  });
  return pred;
}

at::Tensor vote_cpu(const at::Tensor& neighbor_labels, int64_t num_classes) {
  check_vote_args("vote", neighbor_labels, num_classes);
  return vote_cpu_checked(neighbor_labels, num_classes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_cpu(
    const at::Tensor& queries, const at::Tensor& support, const at::Tensor& support_labels,
    int64_t k, int64_t num_classes, const c10::optional<at::Tensor>& self_index,
    int64_t skip, c10::string_view filter) {
  const int64_t kk = check_knn_vote_args(
      queries, support, support_labels, k, num_classes, self_index, skip);
  auto [dist, index] = knn_cpu_checked("knn_vote", queries, support, kk, skip, self_index,
      c10::nullopt, c10::nullopt, 0, filter);
  const at::Tensor nl = support_labels.index_select(0, index.reshape({-1})).view(index.sizes());
  return {vote_cpu_checked(nl, num_classes), dist, index};
}


// ---- The symmetric path: queries that are the support set (docs/design.md section 13) ----
//
// The squared distance and the canonical key are symmetric ((a - b)^2 == (b - a)^2 exactly,
// and canonical_add's running sums then see the same terms in the same order), so the pair
// (x, y) needs one cross term and one key for both rows' top-k. Rows go strip by strip: the
// cross terms of a strip of rows against every later row (the strip's own block only above
// its diagonal, in pieces), then each pair is a candidate when it passes the threshold of
// either of its rows (each row's own k-th best and seed: section 6's rule applied to each
// direction), and its key is offered to both heaps. Offering an exact key to a heap never
// changes its top-k wrongly, and every pair that belongs to a row's top-k passes that row's
// threshold, so each row gets the general path's top-k, bit for bit.

// Rows per strip (at most kChunkBytes of cross terms, at least kSymMinStrip rows) and rows
// per GEMM piece: the strip's own diagonal block is computed in pieces of kSymPieceRows rows
// from their own first row on, so at most kSymPieceRows / 2 rows per row are computed twice.
constexpr int64_t kSymStripRows = 512;
constexpr int64_t kSymMinStrip = 32;
constexpr int64_t kSymPieceRows = 64;

// The kk smallest upper bounds a row has seen, as a max-heap of kk values (root: the kk-th
// smallest, inf until kk were offered). Each pair is offered once to each of its rows, so
// the root bounds the row's final k-th best key (kth_upper's argument over every pair seen).
template <typename T>
inline void ub_offer(T* h, int64_t kk, T x) {
  if (!(x < h[0])) {
    return;
  }
  int64_t pos = 0;
  while (true) {
    int64_t c = 2 * pos + 1;
    if (c >= kk) {
      break;
    }
    if (c + 1 < kk && h[c] < h[c + 1]) {
      ++c;
    }
    if (!(x < h[c])) {
      break;
    }
    h[pos] = h[c];
    pos = c;
  }
  h[pos] = x;
}

// A row's threshold on the symmetric path: its k-th best key or its kk-th smallest upper
// bound so far, grown (row_threshold with the bound as the seed).
template <typename T>
inline T sym_threshold(const Entry<T>* h, const T* ub, const Rule<T>& rule) {
  const T seed = ub[0] == std::numeric_limits<T>::infinity()
      ? ub[0] : std::max(ub[0], T(0)) * rule.grow + rule.slack;
  return row_threshold(h, rule, seed);
}

// A candidate pair of the symmetric path: rows a (of a) and b (of b) and its lower bound.
template <typename T>
struct SymPair {
  int32_t a, b;
  T lower;
};

// The symmetric scan. Self (`b` undefined): rows of a against a, global index off_a + r,
// the pair (r, r) skipped when `exclude`, else offered once at key 0 (canonical_sqdist of a
// row with itself). Cross (`b` defined, index ranges disjoint): rows of a against b and rows
// of b against a, heaps of a's rows first in `hp`. `an`, `bn`: raw squared norms.
template <typename T>
void sym_scan(const at::Tensor& a, const at::Tensor& b, bool exclude, int64_t kk,
              int64_t off_a, int64_t off_b, Filter filter, const at::Tensor& an,
              const at::Tensor& bn, double amax, double bmax, Entry<T>* hp) {
  const bool self = !b.defined();
  const at::Tensor& bs = self ? a : b;
  const int64_t na = a.size(0);
  const int64_t nb = bs.size(0);
  const int64_t d = a.size(1);
  const int64_t gb = self ? off_a : off_b;  // global index of b's row 0
  Entry<T>* ha = hp;
  Entry<T>* hb = self ? hp : hp + na * kk;
  if (self && !exclude) {
    for (int64_t r = 0; r < na; ++r) {
      offer(ha + r * kk, kk, T(0), off_a + r);
    }
  }
  if (na == 0 || nb == 0) {
    return;
  }
  // The shift of knn_cpu_impl, from a's rows (the filter's only: any center is exact).
  std::atomic<int64_t> norms_ns{0};
  PhaseTimer norms_timer(norms_ns);
  const std::vector<Filter> chain = fallback_chain(filter);
  const at::Tensor center = shift_center<T>(chain, true, a, an);
  const bool shift = center.defined();
  const T* cp = shift ? center.const_data_ptr<T>() : nullptr;
  const at::Tensor acn = shift ? centred_sqnorms<T>(a, center) : an;
  const at::Tensor bcn = self ? acn : (shift ? centred_sqnorms<T>(bs, center) : bn);
  norms_timer.stop();
  const T* qn = acn.const_data_ptr<T>();
  const T* sn = bcn.const_data_ptr<T>();
  const T* ap = a.const_data_ptr<T>();
  const T* bp = bs.const_data_ptr<T>();

  Scan<T> sc;  // the rules, the format chain and the counters of the general path
  sc.chain = chain;
  sc.d = d;
  sc.kk = kk;
  sc.offset = gb;
  sc.qp = ap;
  sc.sp = bp;
  sc.qn = qn;
  sc.self = nullptr;
  for (int f = 0; f < kNumFilters; ++f) {
    sc.rule[f] = make_rule<T>(static_cast<Filter>(f), d, amax, bmax);
    sc.tried[f] = 0;
    sc.failed[f] = 0;
  }
  for (auto& c : sc.counts) {
    c = 0;
  }
  sc.counts[kStatNsNorms] += norms_ns.load();

  const int64_t strip = std::max<int64_t>(kSymMinStrip, std::min<int64_t>(kSymStripRows,
      kChunkBytes / (std::max<int64_t>(nb, 1) * static_cast<int64_t>(sizeof(T)))));
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<T> dot(std::min(strip, na) * nb);
  std::vector<uint8_t> mark;
  std::vector<T> seeds(kProbeRows), probe_dot;
  std::vector<std::vector<int32_t>> cand;
  std::vector<std::vector<T>> keys;
  std::vector<std::vector<int32_t>> col_cand;
  // The upper bounds seen per row (a's rows, then b's in the cross case) and the pending
  // candidate pairs: their keys wait for thresholds from every pair (flush), as the general
  // path's two passes seed each query from the whole support set; a strip's loose
  // thresholds would otherwise let many more through.
  std::vector<T> ubs((na + (self ? 0 : nb)) * kk, std::numeric_limits<T>::infinity());
  T* ua = ubs.data();
  T* ubb = self ? ubs.data() : ubs.data() + na * kk;
  std::vector<SymPair<T>> pending;
  const int64_t max_pending = kChunkBytes / static_cast<int64_t>(sizeof(SymPair<T>));
  Rule<T> thr_rule = sc.rule[int(sc.chain[0])];  // grow and slack: the largest of the chain
  for (const Filter f : sc.chain) {
    thr_rule.grow = std::max(thr_rule.grow, sc.rule[int(f)].grow);
    thr_rule.slack = std::max(thr_rule.slack, sc.rule[int(f)].slack);
  }
  int64_t nkeys = 0;
  // The keys of the pending pairs that pass either row's threshold now, offered to both.
  const auto flush = [&]() {
    PhaseTimer timer(sc.counts[kStatNsSelect]);
    std::vector<T> ta(na), tb(nb);
    at::parallel_for(0, na, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        ta[r] = sym_threshold(ha + r * kk, ua + r * kk, thr_rule);
      }
    });
    if (self) {
      tb = ta;
    } else {
      at::parallel_for(0, nb, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          tb[r] = sym_threshold(hb + r * kk, ubb + r * kk, thr_rule);
        }
      });
    }
    cand.assign(na, {});
    for (const SymPair<T>& p : pending) {
      if (p.lower <= ta[p.a] || p.lower <= tb[p.b]) {
        cand[p.a].push_back(p.b);
      }
    }
    pending.clear();
    keys.resize(na);
    for (int64_t i = 0; i < na; ++i) {
      keys[i].resize(cand[i].size());
    }
    timer.switch_to(sc.counts[kStatNsKeys]);
    pair_keys(ap, bp, d, nb, cand, kKeyRows,
              [&](int64_t i, size_t t, T key) { keys[i][t] = key; });
    timer.switch_to(sc.counts[kStatNsSelect]);
    std::vector<std::vector<Entry<T>>> by_col(nb);
    for (int64_t i = 0; i < na; ++i) {
      nkeys += static_cast<int64_t>(cand[i].size());
      for (size_t t = 0; t < cand[i].size(); ++t) {
        by_col[cand[i][t]].push_back(Entry<T>{keys[i][t], off_a + i});
      }
    }
    // The rows of a, then (one thread per row of b) b's: no heap is touched by two threads.
    at::parallel_for(0, na, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        for (size_t t = 0; t < cand[i].size(); ++t) {
          offer(ha + i * kk, kk, keys[i][t], gb + cand[i][t]);
        }
      }
    });
    at::parallel_for(0, nb, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t j = r0; j < r1; ++j) {
        for (const Entry<T>& e : by_col[j]) {
          offer(hb + j * kk, kk, e.d, e.i);
        }
      }
    });
  };
  for (int64_t i0 = 0; i0 < na; i0 += strip) {
    const int64_t mi = std::min(strip, na - i0);
    const int64_t c0 = self ? i0 : 0;  // the strip's first column (self: its own first row)
    const int64_t w = nb - c0;         // columns, the row stride of `dot`
    // Row i's first column: self, the one after its own (pairs i < j); cross, all.
    const auto first_col = [&](int64_t i) { return self ? i + 1 : int64_t(0); };
    const auto compute = [&](Filter f, int64_t r0, int64_t r1) {
      const PhaseTimer timer(sc.counts[kStatNsGemm]);
      // GEMM pieces {first row, rows, first column, columns}: the strip's own block
      // (self) in pieces of kSymPieceRows rows from their first row to the block's end,
      // the columns past it in pieces of all the rows (fewer when the threads need work)
      // by kSupportTile columns: each piece converts its rows and columns once, so tall
      // pieces keep that conversion small next to the GEMM.
      std::vector<std::array<int64_t, 4>> items;
      const int64_t diag = self ? mi : 0;  // columns 0..diag are the strip's own rows
      for (int64_t p0 = r0; p0 < std::min(r1, diag); p0 += kSymPieceRows) {
        items.push_back({p0, std::min(kSymPieceRows, r1 - p0), p0, diag - p0});
      }
      const int64_t ntiles = (w - diag + kSupportTile - 1) / kSupportTile;
      int64_t piece = r1 - r0;
      while (piece > kSymPieceRows && ((r1 - r0 + piece - 1) / piece) * ntiles < threads) {
        piece = (piece + 1) / 2;
      }
      for (int64_t p0 = r0; p0 < r1 && ntiles > 0; p0 += piece) {
        for (int64_t j0 = diag; j0 < w; j0 += kSupportTile) {
          items.push_back({p0, std::min(piece, r1 - p0), j0, std::min(kSupportTile, w - j0)});
        }
      }
      // Largest first, each taken by whichever thread is free: the diagonal pieces are small
      // and the tiles large, so a split of the list by position can leave one thread with
      // most of the work. Each piece's product is the same whichever thread computes it.
      std::stable_sort(items.begin(), items.end(), [](const auto& x, const auto& y) {
        return x[1] * x[3] > y[1] * y[3];
      });
      const int64_t nitems = static_cast<int64_t>(items.size());
      std::atomic<int64_t> next{0};
      at::parallel_for(0, std::min(threads, nitems), 1, [&](int64_t, int64_t) {
        thread_local cpu::CentredScratch<T> scratch;
        for (int64_t item = next++; item < nitems; item = next++) {
          const auto& it = items[item];
          cpu::centred_dot(f, ap + (i0 + it[0]) * d, it[1], bp + (c0 + it[2]) * d, it[3], cp,
              d, dot.data() + it[0] * w + it[2], w, scratch);
        }
      });
    };
    // The format's probe, an estimate for its choice only: the strip's first rows against
    // its first kSupportTile columns (their own cross terms: the strip's are then computed
    // once, in the format chosen), each row at its threshold or this tile's seed.
    const int64_t probe = std::min(kProbeRows, mi);
    const int64_t pc = std::min(kSupportTile, w);
    const Filter f = pick_format(sc, mi,
        [&](Filter f) -> int64_t {
          probe_dot.resize(probe * pc);
          thread_local cpu::CentredScratch<T> scratch;
          PhaseTimer timer(sc.counts[kStatNsGemm]);
          cpu::centred_dot(f, ap + i0 * d, probe, bp + c0 * d, pc, cp, d, probe_dot.data(),
              pc, scratch);
          timer.switch_to(sc.counts[kStatNsSeeds]);
          Uppers<T> work;
          for (int64_t i = 0; i < probe; ++i) {
            const int64_t u = std::min(first_col(i), pc);
            seeds[i] = seed_threshold(probe_dot.data() + i * pc + u, pc - u, qn[i0 + i],
                sn + c0 + u, gb + c0 + u, -1, ha + (i0 + i) * kk, kk, sc.rule[int(f)], work);
          }
          return too_loose(sc, f, i0, probe, pc, probe_dot.data(), sn + c0, seeds.data(), ha,
                     0, cpu::fallback_budget()) ? -1 : 0;
        },
        compute);
    const Rule<T>& rule = sc.rule[int(f)];

    // Every pair's upper bound to both of its rows: the strip's rows (vectorised listing of
    // the bounds under the root first), then the columns.
    PhaseTimer timer(sc.counts[kStatNsSeeds]);
    at::parallel_for(0, mi, 16, [&](int64_t q0, int64_t q1) {
      std::vector<int32_t> below;
      for (int64_t i = q0; i < q1; ++i) {
        const int64_t u = first_col(i);
        T* h = ua + (i0 + i) * kk;
        const T* row = dot.data() + i * w;
        below.clear();
        list_below(row + u, w - u, qn[i0 + i], sn + c0 + u, rule.up, h[0], below);
        for (const int32_t j : below) {
          ub_offer(h, kk, filter_bound(qn[i0 + i], sn[c0 + u + j], row[u + j], rule.up));
        }
      }
    });
    at::parallel_for(0, w, 64, [&](int64_t q0, int64_t q1) {
      for (int64_t j = q0; j < q1; ++j) {
        T* h = ubb + (c0 + j) * kk;
        const int64_t rows = self ? std::min(mi, j) : mi;  // self: rows i < j
        for (int64_t i = 0; i < rows; ++i) {
          ub_offer(h, kk, filter_bound(sn[c0 + j], qn[i0 + i], dot[i * w + j], rule.up));
        }
      }
    });
    // Candidates: pairs under either row's threshold now (its k-th best or its upper
    // bounds so far), the rows' listed (and marked) first, then the columns' not listed.
    timer.switch_to(sc.counts[kStatNsSelect]);
    cand.assign(mi, {});
    mark.assign(mi * w, 0);
    at::parallel_for(0, mi, 16, [&](int64_t q0, int64_t q1) {
      for (int64_t i = q0; i < q1; ++i) {
        const int64_t u = first_col(i);
        const T thr = sym_threshold(ha + (i0 + i) * kk, ua + (i0 + i) * kk, thr_rule);
        list_below(dot.data() + i * w + u, w - u, qn[i0 + i], sn + c0 + u, rule.keep, thr,
            cand[i]);
        for (int32_t& j : cand[i]) {
          j += static_cast<int32_t>(u);
          mark[i * w + j] = 1;
        }
      }
    });
    col_cand.assign(w, {});
    at::parallel_for(0, w, 64, [&](int64_t q0, int64_t q1) {
      for (int64_t j = q0; j < q1; ++j) {
        const int64_t rows = self ? std::min(mi, j) : mi;
        const T thr = sym_threshold(hb + (c0 + j) * kk, ubb + (c0 + j) * kk, thr_rule);
        for (int64_t i = 0; i < rows; ++i) {
          if (mark[i * w + j] == 0 &&
              filter_bound(sn[c0 + j], qn[i0 + i], dot[i * w + j], rule.keep) <= thr) {
            col_cand[j].push_back(static_cast<int32_t>(i));
          }
        }
      }
    });
    for (int64_t i = 0; i < mi; ++i) {
      const T* row = dot.data() + i * w;
      for (const int32_t j : cand[i]) {
        pending.push_back(SymPair<T>{static_cast<int32_t>(i0 + i), static_cast<int32_t>(c0 + j),
            filter_bound(qn[i0 + i], sn[c0 + j], row[j], rule.keep)});
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      for (const int32_t i : col_cand[j]) {
        pending.push_back(SymPair<T>{static_cast<int32_t>(i0 + i), static_cast<int32_t>(c0 + j),
            filter_bound(sn[c0 + j], qn[i0 + i], dot[i * w + j], rule.keep)});
      }
    }
    timer.stop();
    if (static_cast<int64_t>(pending.size()) > max_pending) {
      flush();  // bounded memory: these keys now, at the thresholds so far
    }
    // Counters: each pair scanned once per direction.
    const int64_t pairs = self ? mi * w - mi * (mi + 1) / 2 : mi * w;
    if (f != sc.chain[0]) {
      sc.counts[kStatFallbacks] += 1;
    }
    sc.counts[kStatTiles] += 1;
    sc.counts[pairs_stat(f)] += 2 * pairs;
    sc.counts[kStatPairs] += 2 * pairs;
  }
  flush();
  sc.counts[kStatCandidates] += nkeys;
  int64_t seeded = 0;  // rows whose threshold came from their upper bounds
  for (const T* h = ubs.data(); h < ubs.data() + ubs.size(); h += kk) {
    seeded += h[0] != std::numeric_limits<T>::infinity() ? 1 : 0;
  }
  sc.counts[kStatSeeded] += seeded;
  for (int st = 1; st < kNumStats; ++st) {
    stats_add(static_cast<Stat>(st), sc.counts[st].load());
  }
}

std::tuple<at::Tensor, at::Tensor> knn_sym_cpu(
    const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t k, int64_t skip,
    bool exclude_self, const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index, int64_t offset_a, int64_t offset_b,
    c10::string_view filter_arg) {
  const int64_t kk = check_knn_sym_args(
      a, b, k, skip, exclude_self, prev_dist, prev_index, offset_a, offset_b);
  const Filter filter = resolve_filter(
      "knn_sym", filter_arg, at::kCPU, a.scalar_type(), a.size(1));
  const auto compute = knn_compute_dtype(a.scalar_type());
  const int64_t rows = a.size(0) + (b.has_value() ? b->size(0) : 0);
  at::Tensor out_dist = at::empty({rows, k}, a.options().dtype(compute));
  at::Tensor out_index = at::empty({rows, k}, a.options().dtype(at::kLong));
  if (rows == 0) {
    return {out_dist, out_index};
  }
  const at::Tensor x = a.to(compute).contiguous();
  const at::Tensor y = b.has_value() ? b->to(compute).contiguous() : at::Tensor();
  const at::Tensor pd = prev_dist.has_value() ? prev_dist->contiguous() : at::Tensor();
  const at::Tensor pi = prev_index.has_value() ? prev_index->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(compute, "knn_sym_cpu", [&] {
    using T = scalar_t;
    const at::Tensor xn = row_sqnorms<T>(x);
    const at::Tensor yn = y.defined() ? row_sqnorms<T>(y) : xn;
    check_finite_rows("knn_sym", y.defined() ? "a" : "x", xn);
    if (y.defined()) {
      check_finite_rows("knn_sym", "b", yn);
    }
    const auto [xmax, ymax] = check_distance_range("knn_sym", xn, yn);
    std::vector<Entry<T>> heaps = start_heaps(rows, kk,
        pd.defined() ? pd.const_data_ptr<T>() : nullptr,
        pi.defined() ? pi.const_data_ptr<int64_t>() : nullptr);
    sym_scan<T>(x, y, exclude_self, kk, offset_a, offset_b, filter, xn, yn, xmax, ymax,
        heaps.data());
    T* od = out_dist.mutable_data_ptr<T>();
    int64_t* oi = out_index.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        Entry<T>* h = heaps.data() + r * kk;
        std::sort_heap(h, h + kk, entry_less<T>);
        for (int64_t j = 0; j < k; ++j) {
          od[r * k + j] = h[skip + j].d;
          oi[r * k + j] = h[skip + j].i;
        }
      }
    });
  });
  stats_add(kStatCalls, 1);
  return {out_dist, out_index};
}

} // namespace
} // namespace pdepth

TORCH_LIBRARY_IMPL(pdepth, CPU, m) {
  m.impl("knn", &pdepth::knn_cpu);
  m.impl("knn_vote", &pdepth::knn_vote_cpu);
  m.impl("vote", &pdepth::vote_cpu);
  m.impl("knn_sym", &pdepth::knn_sym_cpu);
}
