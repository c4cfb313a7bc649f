// Shared declarations of the pdepth k-NN ops: the ordering rule, the distance formula and
// the argument checks. Every backend (cpu/, cuda/) includes this file, so the rules of
// docs/design.md sections 2 and 6 are written once.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace pdepth {

// (distance, index) ordering: smaller distance first, equal distances to the lower index.
// Index -1 marks an empty slot (fewer than k points seen while streaming); compared as
// uint64 it is the largest index, so empty slots sort after every real neighbour.
template <typename T>
C10_HOST_DEVICE inline bool knn_less(T da, int64_t ia, T db, int64_t ib) {
  return da < db ||
      (da == db && static_cast<uint64_t>(ia) < static_cast<uint64_t>(ib));
}

// Two keys per (query, support) pair (docs/design.md section 6).
// - The GEMM key |a|^2 + |b|^2 - 2 a.b of the centred rows a = q - c, b = s - c, from a fast
//   GEMM (MKL, a bfloat16 kernel, cuBLAS) whose rounding depends on the GEMM's shape, kernel,
//   thread count and filter format. It only filters.
// - The canonical key, sum_d (q_d - s_d)^2 from a fixed-order function of the two original
//   rows alone (canonical_sqdist in each backend). Neighbours are ranked by it, so the output
//   depends on nothing else: not on tiling, chunking (streaming), threads or the filter.
// A pair is a candidate when
//     lower = (|a|^2 + |b|^2) * keep - 2 a.b  <=  kth * grow + slack
// with kth the query's current k-th best canonical key. `keep` = 1 - m bounds the GEMM key's
// error (m: the filter format's input rounding, the float32 accumulation over blocks of the
// reduction dimension, the norms, the shift by c); `grow` bounds the canonical key's own
// rounding relative to the key; `slack` covers flushed denormals. So no pair whose canonical
// key qualifies is ever filtered out, whatever the filter format.

// The filter's GEMM format (the `filter=` argument of knn / knn_vote, resolved from "auto").
// fp32: the compute dtype's own GEMM (float64 for float64 inputs). bf16: rows rounded to
// bfloat16, products exact in float32, float32 accumulation. bf16x3: each row split into a
// bfloat16 high part and a bfloat16 residual, hi.hi + hi.lo + lo.hi in one GEMM over 3x the
// reduction dimension. tf32: CUDA tensor cores with TF32 inputs.
enum class Filter : int { kFp32 = 0, kBf16 = 1, kBf16x3 = 2, kTf32 = 3 };
constexpr int kNumFilters = 4;

// The most classes a vote counts (pdepth.MAX_CLASSES): each thread keeps one count per class.
constexpr int64_t kMaxClasses = int64_t(1) << 24;
const char* filter_name(Filter f);

// Width of the reduction blocks whose GEMM results are summed in a fixed order (CPU): the
// GEMM's rounding then grows with kReduceBlock + D / kReduceBlock instead of with D.
constexpr int64_t kReduceBlock = 1024;
// "auto" picks a low-precision CPU filter from this D on (below it the scan dominates).
constexpr int64_t kAutoBf16MinD = 32;
// CUDA: one cuBLASLt GEMM per reduction block of this width, summed in order (beta = 1):
// wide enough that a tile is never re-read more than D / 8192 times, narrow enough that the
// truncating tensor-core accumulation keeps every format's margin finite (docs/design.md 6.6).
constexpr int64_t kCudaReduceBlock = 8192;
// What "auto" resolves to on CUDA. Stays fp32 until a card has shown the tensor-core formats
// bit-identical to fp32 (issue 28); the switch is this line (and CUDA_AUTO_FILTER in
// tests/test_knn_cuda.py).
constexpr Filter kCudaAutoFilter = Filter::kFp32;

// The candidate rule's constants for one (filter, D, compute dtype, backend).
struct FilterMargin {
  double keep;   // 1 - m: multiplies |a|^2 + |b|^2
  double grow;   // multiplies the k-th best canonical key
  double m;      // the GEMM-side margin, relative to |a|^2 + |b|^2
};

// For the kernels of `device`: the CPU's (16-lane canonical key, reduction in blocks of
// kReduceBlock) or CUDA's (32 lanes, blocks of kCudaReduceBlock, tensor-core accumulation
// and TF32 inputs assumed to truncate). Both centre the rows and round to bfloat16 to nearest.
// Derived in docs/design.md section 6.2.
FilterMargin filter_margin(Filter f, int64_t d, bool dbl, at::DeviceType device);

// Absolute slack for flushed denormals (docs/design.md 6.2, step 6); qmax / smax are the
// largest squared norms of the raw rows.
double filter_slack(int64_t d, bool dbl, double qmax, double smax);

template <typename T>
C10_HOST_DEVICE inline T filter_bound(T qnorm, T snorm, T dot, T keep) {
  return (qnorm + snorm) * keep - T(2) * dot;
}

// Resolves the op's `filter` string for these inputs: "auto" by the documented rule (section
// 6.5), an explicit mode checked against the device and dtype. Raises ValueError listing the
// valid values for an unknown string. `why` (optional) receives the reason for the choice.
Filter resolve_filter(
    const char* op, c10::string_view filter, at::DeviceType device, at::ScalarType dtype,
    int64_t d, std::string* why = nullptr);

// Candidate control (section 6.5): the first format of `chain` (the requested one, then more
// precise ones) that has not failed on most of the blocks that tried it so far, so that data
// which defeats a format on its first tiles skips it on the rest. `tried` / `failed` are
// indexed by format (plain counts on CUDA, atomics on the CPU).
template <typename Count>
size_t chain_start(const std::vector<Filter>& chain, const Count* tried, const Count* failed) {
  size_t l = 0;
  while (l + 1 < chain.size() && failed[int(chain[l])] >= 2 &&
         2 * failed[int(chain[l])] >= tried[int(chain[l])]) {
    ++l;
  }
  return l;
}

// Counters of what the kernels did, summed over calls (pdepth.knn_stats()).
enum Stat : int {
  kStatCalls = 0,
  kStatPairs,          // (query, support) pairs scanned
  kStatCandidates,     // canonical keys computed
  kStatSeeded,         // rows whose threshold was seeded from the GEMM keys
  kStatTiles,          // (query block, support tile) GEMMs
  kStatFallbacks,      // of those, recomputed in fp32 after the low-precision filter let too many through
  kStatPairsFp32,      // pairs filtered by each mode (after fallbacks)
  kStatPairsBf16,
  kStatPairsBf16x3,
  kStatPairsTf32,
  kStatNsGemm,         // wall-clock nanoseconds of each phase (summed over threads where
  kStatNsNorms,        // blocks run in parallel): cross terms, norms / means / shifts,
  kStatNsSeeds,        // seeds, canonical keys (with the heap offers), selection (lists
  kStatNsKeys,         // of candidates, fallback probes, the final sort)
  kStatNsSelect,
  kNumStats
};
void stats_add(Stat s, int64_t v);
std::vector<int64_t> stats_read(bool reset);
inline Stat pairs_stat(Filter f) {
  return static_cast<Stat>(kStatPairsFp32 + static_cast<int>(f));
}

// Accumulation / output dtype: float32 for float16, bfloat16 and float32 inputs.
at::ScalarType knn_compute_dtype(at::ScalarType input);

// Validates the arguments of knn / knn_vote and returns the number of neighbours the kernel
// keeps per query (k + skip). `op` names the op in messages.
int64_t check_knn_args(
    const char* op,
    const at::Tensor& queries,
    const at::Tensor& support,
    int64_t k,
    const c10::optional<at::Tensor>& self_index,
    int64_t skip,
    const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index,
    int64_t offset);

// knn_sym (docs/design.md section 13): the rows of `a` against themselves (`b` absent; the
// pair (r, r) skipped when exclude_self) or, `b` given, a's rows against b's and b's against
// a's (disjoint global index ranges offset_a.. and offset_b..; prev [na + nb, kk], a's rows
// first). skip (drop_nearest) only for a whole set without prev. Returns k + skip.
int64_t check_knn_sym_args(
    const at::Tensor& a,
    const c10::optional<at::Tensor>& b,
    int64_t k,
    int64_t skip,
    bool exclude_self,
    const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index,
    int64_t offset_a,
    int64_t offset_b);

// knn_vote: check_knn_args (no streaming) plus the labels; returns k + skip.
int64_t check_knn_vote_args(
    const at::Tensor& queries,
    const at::Tensor& support,
    const at::Tensor& support_labels,
    int64_t k,
    int64_t num_classes,
    const c10::optional<at::Tensor>& self_index,
    int64_t skip);

// Labels: 1-D integer tensor of length n on `device`, values in [0, num_classes).
void check_labels(
    const char* op,
    const char* name,
    const at::Tensor& labels,
    int64_t n,
    int64_t num_classes,
    const at::Device& device);

// Neighbour labels for vote: 2-D int64 [M, k] with k >= 1 and values in [0, num_classes),
// or -1 for a missing neighbour (an empty slot of a stream), which does not vote.
void check_vote_args(const char* op, const at::Tensor& neighbor_labels, int64_t num_classes);

// Squared row norms are finite iff every entry of the row is finite (and the squares do not
// overflow); checking the norms costs O(rows) instead of a pass over the whole tensor.
// `first_row` is the index of sqnorms[0] in the named tensor (for messages).
void check_finite_rows(
    const char* op, const char* name, const at::Tensor& sqnorms, int64_t first_row = 0);

// The range rule: every quantity a kernel forms from a query q and a support row s (squared
// norms of the raw and the centered rows, their sums, the GEMM key and its margin, the
// canonical key |q - s|^2 <= 2 (|q|^2 + |s|^2)) is at most 8 * (max |q|^2 + max |s|^2), so
// that bound must be finite in the compute dtype, or a neighbour could be chosen by an
// overflowed (inf / NaN) key. `qn`, `sn`: the raw rows' squared norms in the compute dtype
// (already checked finite), any device. Raises ValueError naming the larger tensor.
// Returns (max |q|^2, max |s|^2) (0 for an empty tensor).
std::pair<double, double> check_distance_range(
    const char* op, const at::Tensor& qn, const at::Tensor& sn);

// The self index as an int64 tensor of length M with -1 for "no self match", or an
// undefined tensor when none was given.
at::Tensor self_index_or_empty(const c10::optional<at::Tensor>& self_index);

} // namespace pdepth
