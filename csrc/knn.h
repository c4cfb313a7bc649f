// Shared declarations of the pdepth k-NN ops: the ordering rule, the distance formula and
// the argument checks. Every backend (cpu/, cuda/) includes this file, so the rules of
// docs/design.md sections 2 and 6 are written once.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace pdepth {

// (distance, index) ordering: smaller distance first, equal distances to the lower index.
// Index -1 marks an empty slot (fewer than k points seen while streaming); compared as
// uint64 it is the largest index, so empty slots sort after every real neighbour.
template <typename T>
C10_HOST_DEVICE inline bool knn_less(T da, int64_t ia, T db, int64_t ib) {
  return da < db ||
      (da == db && static_cast<uint64_t>(ia) < static_cast<uint64_t>(ib));
}

// Two keys per (query, support) pair.
// - The GEMM key |q|^2 + |s|^2 - 2 q.s (q, s possibly shifted by a common center), from a
//   fast GEMM (MKL / cuBLAS) whose rounding depends on the GEMM's shape, kernel and thread
//   count. It only filters.
// - The canonical key, sum_d (q_d - s_d)^2 from a fixed-order function of the two rows
//   alone (canonical_sqdist in each backend). The neighbours are ranked by it, so the output
//   never depends on tiling, chunking (streaming) or threads; it is translation invariant,
//   exact whenever the inputs make it exact, and within D * eps * |q - s|^2 of the truth.
// A pair is a candidate when gemm_key - filter_margin(D) * (|q|^2 + |s|^2) <= the k-th best
// canonical key (norms of the rows the GEMM saw). The margin bounds the error of the GEMM
// key plus that of the canonical key (|q - s|^2 <= 2 (|q|^2 + |s|^2)) with room to spare, so
// no pair whose canonical key qualifies is ever filtered out.
template <typename T>
C10_HOST_DEVICE inline T filter_margin(int64_t d) {
  const T eps = sizeof(T) == 8 ? T(2.220446049250313e-16) : T(1.1920928955078125e-07);
  return T(4) * (T(d) + T(16)) * eps;
}

// Lower bound of the canonical key from the GEMM key: keep = 1 - filter_margin(D).
template <typename T>
C10_HOST_DEVICE inline T filter_bound(T qnorm, T snorm, T dot, T keep) {
  return (qnorm + snorm) * keep - T(2) * dot;
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
void check_distance_range(const char* op, const at::Tensor& qn, const at::Tensor& sn);

// The self index as an int64 tensor of length M with -1 for "no self match", or an
// undefined tensor when none was given.
at::Tensor self_index_or_empty(const c10::optional<at::Tensor>& self_index);

} // namespace pdepth
