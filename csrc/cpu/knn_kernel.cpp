// CPU kernels of the pdepth ops: blocked GEMM through ATen (MKL/OpenBLAS) for the cross
// terms, then a fused scan that filters them against each query's running k-th best and
// ranks the few candidates by their canonical key (knn.h) in a max-heap whose root is the
// k-th best. Parallel over query blocks; the output depends neither on the thread count nor
// on how the support set is chunked.
#include "../knn.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
// The scan tests this many keys against the threshold at once (vectorised); only groups
// holding a candidate take the scalar heap path.
constexpr int64_t kScanWidth = 16;
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

// The canonical key (knn.h): sum_d (a_d - b_d)^2 as 16 running sums (sum t takes
// d = t mod 16, in order) and a fixed pairwise reduction. One out-of-line function, so every
// caller runs the same instructions and a pair's key depends on the two rows alone.
template <typename T>
__attribute__((always_inline)) inline T canonical_sqdist_impl(const T* a, const T* b, int64_t d) {
  T acc[16] = {};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    for (int t = 0; t < 16; ++t) {
      const T diff = a[j + t] - b[j + t];
      acc[t] += diff * diff;
    }
  }
  for (int t = 0; j < d; ++j, ++t) {
    const T diff = a[j] - b[j];
    acc[t] += diff * diff;
  }
  for (int w = 8; w >= 1; w /= 2) {
    for (int t = 0; t < w; ++t) {
      acc[t] += acc[t + w];
    }
  }
  return acc[0];
}

// Compiled for AVX-512, AVX2+FMA and baseline x86-64; the loader picks one clone per process
// (ifunc), so a machine always runs the same instructions. Out of line on purpose: every
// caller gets those same instructions, hence the same bits (knn.h).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDEPTH_CLONES __attribute__((noinline, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PDEPTH_CLONES __attribute__((noinline))
#endif

PDEPTH_CLONES float canonical_sqdist(const float* a, const float* b, int64_t d) {
  return canonical_sqdist_impl(a, b, d);
}
PDEPTH_CLONES double canonical_sqdist(const double* a, const double* b, int64_t d) {
  return canonical_sqdist_impl(a, b, d);
}

// One query against one support tile. `dot`, `qnorm`, `snorm` are the GEMM cross terms and
// norms of the centered rows; a group of kScanWidth filter bounds is tested at once against
// the k-th best (vectorised), and only candidates get their canonical key from the original
// rows `qrow`, `srows` and touch the heap `h` (size k).
template <typename T>
__attribute__((always_inline)) inline void select_row_impl(
    const T* dot, int64_t nb, const T* qrow, const T* srows, int64_t d, T qnorm,
    const T* snorm, int64_t gbase, int64_t self, Entry<T>* h, int64_t k) {
  const T keep = T(1) - filter_margin<T>(d);
  T lower[kScanWidth];
  const auto consider = [&](int64_t j, T low) {
    const int64_t g = gbase + j;
    if (low <= h[0].d && g != self) {
      offer(h, k, canonical_sqdist(qrow, srows + j * d, d), g);
    }
  };
  int64_t j0 = 0;
  for (; j0 + kScanWidth <= nb; j0 += kScanWidth) {
    const T thr = h[0].d;
    for (int64_t t = 0; t < kScanWidth; ++t) {
      lower[t] = filter_bound(qnorm, snorm[j0 + t], dot[j0 + t], keep);
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
    consider(j0, filter_bound(qnorm, snorm[j0], dot[j0], keep));
  }
}

// The scan is most of the CPU time at small D: give it the machine's vector width too.
PDEPTH_CLONES void select_row(
    const float* dot, int64_t nb, const float* qrow, const float* srows, int64_t d,
    float qnorm, const float* snorm, int64_t gbase, int64_t self, Entry<float>* h, int64_t k) {
  select_row_impl(dot, nb, qrow, srows, d, qnorm, snorm, gbase, self, h, k);
}
PDEPTH_CLONES void select_row(
    const double* dot, int64_t nb, const double* qrow, const double* srows, int64_t d,
    double qnorm, const double* snorm, int64_t gbase, int64_t self, Entry<double>* h,
    int64_t k) {
  select_row_impl(dot, nb, qrow, srows, d, qnorm, snorm, gbase, self, h, k);
}

// Squared row norms, accumulated in double.
template <typename T>
at::Tensor row_sqnorms(const at::Tensor& x) {
  const int64_t rows = x.size(0);
  const int64_t d = x.size(1);
  at::Tensor out = at::empty({rows}, x.options());
  const T* p = x.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)),
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* row = p + r * d;
          double acc = 0.0;
          for (int64_t j = 0; j < d; ++j) {
            acc += static_cast<double>(row[j]) * static_cast<double>(row[j]);
          }
          o[r] = static_cast<T>(acc);
        }
      });
  return out;
}

// Support tiles in order; within a tile, query blocks in parallel. The GEMM sees rows shifted
// by the queries' mean, so its error (and the filter margin) scales with the spread of the
// data rather than its distance from the origin (ReLU features sit far from it). The center
// depends on the queries only: every streamed chunk is shifted by the same vector.
template <typename T>
void knn_cpu_impl(
    const at::Tensor& q, const at::Tensor& s, const at::Tensor& self_index,
    const at::Tensor& prev_dist, const at::Tensor& prev_index, int64_t kk, int64_t skip,
    int64_t offset, at::Tensor& out_dist, at::Tensor& out_index) {
  const int64_t m = q.size(0);
  const int64_t n = s.size(0);
  const int64_t k = kk - skip;
  const int64_t d = q.size(1);
  const T* qp = q.const_data_ptr<T>();
  const T* sp = s.const_data_ptr<T>();
  const int64_t* self = self_index.defined() ? self_index.const_data_ptr<int64_t>() : nullptr;
  const T* pd = prev_dist.defined() ? prev_dist.const_data_ptr<T>() : nullptr;
  const int64_t* pi = prev_index.defined() ? prev_index.const_data_ptr<int64_t>() : nullptr;
  T* od = out_dist.mutable_data_ptr<T>();
  int64_t* oi = out_index.mutable_data_ptr<int64_t>();

  const at::Tensor center = (q.sum(0, false, at::kDouble) / static_cast<double>(m)).to(q.scalar_type());
  const at::Tensor qc = q - center;
  const at::Tensor qcn = row_sqnorms<T>(qc);
  const T* qn = qcn.const_data_ptr<T>();

  std::vector<Entry<T>> heaps(m * kk);
  at::parallel_for(0, m, 256, [&](int64_t r0, int64_t r1) {
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

  // Small D: per-thread GEMMs of [qblock x tile] whose output stays in cache (blocks small
  // enough to give every thread work). Large D: the GEMM dominates, so one multithreaded
  // GEMM per (query super-block, tile) lets the BLAS pack each support tile once; the scan
  // then runs in parallel over queries. The output depends on neither choice.
  const bool wide = d >= kWideD;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t qblock = wide
      ? std::min<int64_t>(m, kWideQueryBlock)
      : std::clamp<int64_t>((m + threads - 1) / threads, 16, kQueryBlock);
  const int64_t nblocks = (m + qblock - 1) / qblock;
  // Scans rows m0..m0+mb of a tile's cross terms into the heaps at `hp` (indexed by query).
  const auto scan = [&](const T* dp, int64_t m0, int64_t mb, int64_t nb, int64_t n0,
                        const T* sn, Entry<T>* hp) {
    for (int64_t i = 0; i < mb; ++i) {
      select_row(dp + i * nb, nb, qp + (m0 + i) * d, sp + n0 * d, d, qn[m0 + i], sn,
          offset + n0, self != nullptr ? self[m0 + i] : -1, hp + (m0 + i) * kk, kk);
    }
  };
  // A support tile shifted by the center, and its squared norms (finite: the range rule
  // of check_distance_range bounds them).
  const auto centered_tile = [&](int64_t n0, int64_t nb) {
    at::Tensor sc = s.narrow(0, n0, nb) - center;
    at::Tensor scn = row_sqnorms<T>(sc);
    return std::make_pair(std::move(sc), std::move(scn));
  };
  const int64_t ntiles = (n + kSupportTile - 1) / kSupportTile;
  const bool split_support = nblocks < threads && ntiles > 1;
  if (split_support) {
    // Too few queries to give every thread a block: split the support tiles over the
    // threads instead, each with its own heaps, then merge them. Exact (canonical keys,
    // distinct indices), so the merge order does not matter.
    std::mutex merge;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Entry<T>> local(m * kk, Entry<T>{std::numeric_limits<T>::infinity(), -1});
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kSupportTile;
        const int64_t nb = std::min(kSupportTile, n - n0);
        const std::pair<at::Tensor, at::Tensor> tile = centered_tile(n0, nb);
        const at::Tensor dot = at::mm(qc, tile.first.t());
        scan(dot.const_data_ptr<T>(), 0, m, nb, n0, tile.second.const_data_ptr<T>(),
            local.data());
      }
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t e = 0; e < m * kk; ++e) {
        if (local[e].i >= 0) {
          offer(heaps.data() + (e / kk) * kk, kk, local[e].d, local[e].i);
        }
      }
    });
  } else {
    for (int64_t n0 = 0; n0 < n; n0 += kSupportTile) {
      const int64_t nb = std::min(kSupportTile, n - n0);
      const std::pair<at::Tensor, at::Tensor> tile = centered_tile(n0, nb);
      const at::Tensor& sc = tile.first;
      const T* sn = tile.second.const_data_ptr<T>();
      if (wide) {
        for (int64_t m0 = 0; m0 < m; m0 += qblock) {
          const int64_t mb = std::min(qblock, m - m0);
          const at::Tensor dot = at::mm(qc.narrow(0, m0, mb), sc.t());
          const T* dp = dot.const_data_ptr<T>();
          at::parallel_for(0, mb, 16, [&](int64_t i0, int64_t i1) {
            scan(dp + i0 * nb, m0 + i0, i1 - i0, nb, n0, sn, heaps.data());
          });
        }
        continue;
      }
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * qblock;
          const int64_t mb = std::min(qblock, m - m0);
          const at::Tensor dot = at::mm(qc.narrow(0, m0, mb), sc.t());
          scan(dot.const_data_ptr<T>(), m0, mb, nb, n0, sn, heaps.data());
        }
      });
    }
  }

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
}

// knn on checked arguments (kk = k + skip neighbours kept per query).
std::tuple<at::Tensor, at::Tensor> knn_cpu_checked(
    const char* op, const at::Tensor& queries, const at::Tensor& support, int64_t kk,
    int64_t skip, const c10::optional<at::Tensor>& self_index,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset) {
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
    const at::Tensor qn = row_sqnorms<scalar_t>(q);
    const at::Tensor sn = row_sqnorms<scalar_t>(s);
    check_finite_rows(op, "queries", qn);
    check_finite_rows(op, "support", sn);
    check_distance_range(op, qn, sn);
    knn_cpu_impl<scalar_t>(q, s, si, pd, pi, kk, skip, offset, out_dist, out_index);
  });
  return {out_dist, out_index};
}

std::tuple<at::Tensor, at::Tensor> knn_cpu(
    const at::Tensor& queries, const at::Tensor& support, int64_t k,
    const c10::optional<at::Tensor>& self_index, int64_t skip,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset) {
  const int64_t kk = check_knn_args(
      "knn", queries, support, k, self_index, skip, prev_dist, prev_index, offset);
  return knn_cpu_checked(
      "knn", queries, support, kk, skip, self_index, prev_dist, prev_index, offset);
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
    int64_t skip) {
  const int64_t kk = check_knn_vote_args(
      queries, support, support_labels, k, num_classes, self_index, skip);
  auto [dist, index] = knn_cpu_checked(
      "knn_vote", queries, support, kk, skip, self_index, c10::nullopt, c10::nullopt, 0);
  const at::Tensor nl = support_labels.index_select(0, index.reshape({-1})).view(index.sizes());
  return {vote_cpu_checked(nl, num_classes), dist, index};
}

} // namespace
} // namespace pdepth

TORCH_LIBRARY_IMPL(pdepth, CPU, m) {
  m.impl("knn", &pdepth::knn_cpu);
  m.impl("knn_vote", &pdepth::knn_vote_cpu);
  m.impl("vote", &pdepth::vote_cpu);
}
