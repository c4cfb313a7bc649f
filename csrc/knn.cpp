// The op schema (one TORCH_LIBRARY block), the argument checks shared by every backend,
// and the Python module pdepth._C with its build information.
#include "knn.h"
#include "cpu/filter_gemm.h"

#include <torch/library.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#ifdef PDEPTH_WITH_CUDA
#include <cuda.h>
#endif

// setup.py passes the torch version and CUDA archs the extension was built for.
#ifndef PDEPTH_TORCH_VERSION
#define PDEPTH_TORCH_VERSION "unknown"
#endif
#ifndef PDEPTH_CUDA_ARCHS
#define PDEPTH_CUDA_ARCHS ""
#endif

namespace pdepth {

at::ScalarType knn_compute_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

const char* filter_name(Filter f) {
  switch (f) {
    case Filter::kFp32:
      return "fp32";
    case Filter::kBf16:
      return "bf16";
    case Filter::kBf16x3:
      return "bf16x3";
    case Filter::kTf32:
      return "tf32";
  }
  return "?";
}

// docs/design.md section 6.2. First-order sum of the GEMM key's error terms relative to
// Q = |a|^2 + |b|^2, then 1.25x and 16 unit roundoffs for the second-order terms (valid while
// every n u <= 0.01; beyond that the filter passes every pair).
FilterMargin filter_margin(Filter f, int64_t d, bool dbl, at::DeviceType device) {
  const bool cuda = device == at::kCUDA;
  const int64_t lanes = cuda ? 32 : 16;
  const bool centred = true;  // the CPU and CUDA both shift by the queries' mean (or by 0)
  const int64_t block = cuda ? kCudaReduceBlock : kReduceBlock;
  const bool truncating = cuda && f != Filter::kFp32;
  const double u = dbl ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  const double u_acc = truncating ? 2 * u : u;
  // Input format: relative error of each product a_d b_d (exact products in float32).
  double eps_in = 0.0;
  double width = 1.0;  // terms per element of the reduction
  if (f == Filter::kBf16) {
    const double r = std::ldexp(1.0, -8);  // pdepth rounds to bfloat16 itself, to nearest
    eps_in = 2 * r + r * r;
  } else if (f == Filter::kBf16x3) {
    eps_in = 3.01 * std::ldexp(1.0, -16);  // 2 * 2^-16 residual rounding + the lo.lo dropped
    width = 3.0;
  } else if (f == Filter::kTf32) {
    const double r = truncating ? std::ldexp(1.0, -10) : std::ldexp(1.0, -11);
    eps_in = 2 * r + r * r;
  }
  const int64_t b = block > 0 ? std::min(block, d) : d;
  const int64_t nblocks = block > 0 ? (d + block - 1) / block : 1;
  const double n_acc = width * static_cast<double>(b) + static_cast<double>(nblocks);
  const double eps_acc = 1.02 * n_acc * u_acc;
  const double eps_norms = u + static_cast<double>(d) * (dbl ? 1.01 * u : std::ldexp(1.0, -53));
  const double first = eps_in + eps_acc + 2 * eps_norms + 4 * u + (centred ? 4 * u : 0.0);
  const double n_c = std::ceil(static_cast<double>(d) / lanes) + std::log2(lanes) + 3;
  FilterMargin out;
  if (n_acc * u_acc > 0.01 || n_c * u > 0.01 || first > 0.01) {
    out.m = std::numeric_limits<double>::infinity();
    out.keep = -1e30;  // every lower bound <= 0 <= every threshold: all pairs pass
    out.grow = 1.0;
    return out;
  }
  out.m = 1.25 * first + 16 * u;
  out.keep = 1.0 - out.m;
  out.grow = 1.0 + 1.25 * (n_c + 4) * u;
  return out;
}

double filter_slack(int64_t d, bool dbl, double qmax, double smax) {
  // Denormals flushed to zero (VDPBF16PS, or a user's flush-denormal mode): at most the
  // smallest normal per rounding, over sum |a_d| + |b_d| <= sqrt(2 D Q) and D additions.
  const double tiny = dbl ? std::ldexp(1.0, -1018) : std::ldexp(1.0, -124);
  const double qbound = 6.0 * (qmax + smax);  // |q - c|^2 + |s - c|^2, c the queries' mean
  return tiny * (std::sqrt(2.0 * static_cast<double>(d) * qbound) + 2.0 * static_cast<double>(d));
}

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

} // namespace

namespace {

constexpr const char* kFilterValues = "'auto', 'fp32', 'bf16', 'bf16x3', 'tf32'";

bool parse_filter(c10::string_view name, Filter* out) {
  for (int f = 0; f < kNumFilters; ++f) {
    if (name == filter_name(static_cast<Filter>(f))) {
      *out = static_cast<Filter>(f);
      return true;
    }
  }
  return false;
}

// The "auto" rule (docs/design.md 6.5): a low-precision filter where the CPU has a bfloat16
// matrix unit pdepth drives (AVX512-BF16 through pdepth's kernel, AMX through MKL) and D is
// large enough for the GEMM to dominate the scan; fp32 otherwise. CUDA stays at fp32 until
// the tensor-core modes have been shown exact on a card.
Filter auto_filter(at::DeviceType device, at::ScalarType dtype, int64_t d, std::string* why) {
  const auto say = [&](const std::string& w) {
    if (why != nullptr) {
      *why = w;
    }
  };
  if (dtype == at::kDouble) {
    say("float64 inputs: the float64 GEMM filter");
    return Filter::kFp32;
  }
  if (device != at::kCPU) {
    say(kCudaAutoFilter == Filter::kFp32
        ? "CUDA: fp32 until the tensor-core filters have run exact on a card"
        : std::string("CUDA: ") + filter_name(kCudaAutoFilter) + " on the tensor cores");
    return kCudaAutoFilter;
  }
  const cpu::Bf16Gemm g = cpu::bf16_gemm();
  const bool fast = g == cpu::Bf16Gemm::kKernel || (g == cpu::Bf16Gemm::kMkl && cpu::has_amx_bf16());
  if (!fast) {
    say("no bfloat16 matrix unit (AVX512-BF16 or AMX-BF16) on this CPU");
    return Filter::kFp32;
  }
  if (d < kAutoBf16MinD) {
    say("D=" + std::to_string(d) + " < " + std::to_string(kAutoBf16MinD) +
        ": the scan, not the GEMM, dominates");
    return Filter::kFp32;
  }
  say(std::string("bfloat16 GEMM through the ") + cpu::bf16_gemm_name(g) +
      ", a more precise format per block where it lets too many pairs through");
  return Filter::kBf16;
}

} // namespace

Filter resolve_filter(
    const char* op, c10::string_view filter, at::DeviceType device, at::ScalarType dtype,
    int64_t d, std::string* why) {
  if (filter == "auto") {
    return auto_filter(device, dtype, d, why);
  }
  Filter f = Filter::kFp32;
  TORCH_CHECK_VALUE(parse_filter(filter, &f),
      op, "(): filter must be one of ", kFilterValues, ", got '", filter, "'");
  TORCH_CHECK_VALUE(f == Filter::kFp32 || dtype != at::kDouble,
      op, "(): filter='", filter, "' needs float32, float16 or bfloat16 inputs; float64 "
      "inputs are filtered by a float64 GEMM (filter='fp32' or 'auto')");
  TORCH_CHECK_VALUE(f != Filter::kTf32 || device == at::kCUDA,
      op, "(): filter='tf32' is a CUDA tensor-core format; on the CPU use 'auto', 'fp32', "
      "'bf16' or 'bf16x3'");
  if (why != nullptr) {
    *why = "requested";
  }
  return f;
}

namespace {
std::atomic<int64_t> g_stats[kNumStats];
} // namespace

void stats_add(Stat s, int64_t v) {
  g_stats[s].fetch_add(v, std::memory_order_relaxed);
}

std::vector<int64_t> stats_read(bool reset) {
  std::vector<int64_t> out(kNumStats);
  for (int i = 0; i < kNumStats; ++i) {
    out[i] = reset ? g_stats[i].exchange(0) : g_stats[i].load();
  }
  return out;
}

int64_t check_knn_args(
    const char* op,
    const at::Tensor& queries,
    const at::Tensor& support,
    int64_t k,
    const c10::optional<at::Tensor>& self_index,
    int64_t skip,
    const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index,
    int64_t offset) {
  TORCH_CHECK_VALUE(queries.dim() == 2,
      op, "(): queries must be 2-D [M, D], got shape ", shape_str(queries));
  TORCH_CHECK_VALUE(support.dim() == 2,
      op, "(): support must be 2-D [N, D], got shape ", shape_str(support));
  TORCH_CHECK_VALUE(is_supported_float(queries.scalar_type()),
      op, "(): queries must be float16, bfloat16, float32 or float64, got ", queries.scalar_type());
  TORCH_CHECK_VALUE(queries.scalar_type() == support.scalar_type(),
      op, "(): queries and support must have the same dtype, got queries ",
      queries.scalar_type(), " and support ", support.scalar_type());
  TORCH_CHECK(queries.device() == support.device(),
      op, "(): queries and support must be on the same device, got queries on ",
      queries.device(), " and support on ", support.device());
  TORCH_CHECK_VALUE(queries.size(1) == support.size(1),
      op, "(): queries and support must have the same dimension D, got queries ",
      shape_str(queries), " and support ", shape_str(support));
  TORCH_CHECK_VALUE(k >= 1, op, "(): k must be >= 1, got k=", k);
  TORCH_CHECK_VALUE(skip == 0 || skip == 1, op, "(): skip must be 0 or 1, got ", skip);
  TORCH_CHECK_VALUE(offset >= 0, op, "(): offset must be >= 0, got offset=", offset);

  const int64_t m = queries.size(0);
  const int64_t n = support.size(0);
  // k + skip and offset + N are formed below and in the kernels: keep them in int64.
  constexpr int64_t kMaxInt64 = std::numeric_limits<int64_t>::max();
  TORCH_CHECK_VALUE(k <= kMaxInt64 - skip,
      op, "(): k=", k, " is too large (k + ", skip, " dropped nearest must fit in int64)");
  TORCH_CHECK_VALUE(offset <= kMaxInt64 - n,
      op, "(): offset + N must fit in int64, got offset=", offset, " and N=", n);
  const int64_t kk = k + skip;
  const bool streaming = prev_dist.has_value() || prev_index.has_value();

  bool any_self_in_chunk = false;
  if (self_index.has_value()) {
    const auto& si = *self_index;
    TORCH_CHECK_VALUE(si.dim() == 1 && si.size(0) == m,
        op, "(): self_index must be 1-D with one entry per query (", m, "), got shape ",
        shape_str(si));
    TORCH_CHECK_VALUE(si.scalar_type() == at::kLong,
        op, "(): self_index must be int64, got ", si.scalar_type());
    TORCH_CHECK(si.device() == queries.device(),
        op, "(): self_index must be on the queries' device ", queries.device(), ", got ",
        si.device());
    if (m > 0) {
      const int64_t lo = si.min().item<int64_t>();
      const int64_t hi = si.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= -1,
          op, "(): self_index values must be >= -1 (-1 means no self match), got ", lo);
      if (!streaming) {
        TORCH_CHECK_VALUE(hi < offset + n,
            op, "(): self_index value ", hi, " is out of range for a support set of ", n,
            " points (valid: -1 or 0..", offset + n - 1, ")");
      }
      any_self_in_chunk = ((si >= offset) & (si < offset + n)).any().item<bool>();
    }
  }

  if (streaming) {
    TORCH_CHECK_VALUE(prev_dist.has_value() && prev_index.has_value(),
        op, "(): prev needs both the distances and the indices of the running top-k");
    TORCH_CHECK_VALUE(skip == 0,
        op, "(): streaming (prev) is not supported with self_match='drop_nearest'; stream "
        "with self_match='include' and k+1, then drop the first column");
    const auto& pd = *prev_dist;
    const auto& pi = *prev_index;
    TORCH_CHECK_VALUE(pd.dim() == 2 && pd.size(0) == m && pd.size(1) == kk,
        op, "(): prev distances must have shape [", m, ", ", kk, "], got ", shape_str(pd));
    TORCH_CHECK_VALUE(pi.dim() == 2 && pi.size(0) == m && pi.size(1) == kk,
        op, "(): prev indices must have shape [", m, ", ", kk, "], got ", shape_str(pi));
    TORCH_CHECK_VALUE(pd.scalar_type() == knn_compute_dtype(queries.scalar_type()),
        op, "(): prev distances must be ", knn_compute_dtype(queries.scalar_type()),
        " for ", queries.scalar_type(), " inputs, got ", pd.scalar_type());
    TORCH_CHECK_VALUE(pi.scalar_type() == at::kLong,
        op, "(): prev indices must be int64, got ", pi.scalar_type());
    TORCH_CHECK(pd.device() == queries.device() && pi.device() == queries.device(),
        op, "(): prev must be on the queries' device ", queries.device());
  } else if (m > 0) {
    const int64_t usable = n - (any_self_in_chunk ? 1 : 0);
    TORCH_CHECK_VALUE(kk <= usable,
        op, "(): k=", k, (skip ? " (+1 dropped nearest)" : ""),
        " is larger than the usable support: ", n, " points",
        (any_self_in_chunk ? ", 1 excluded as the self match" : ""));
  }
  return kk;
}

int64_t check_knn_sym_args(
    const at::Tensor& a,
    const c10::optional<at::Tensor>& b,
    int64_t k,
    int64_t skip,
    bool exclude_self,
    const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index,
    int64_t offset_a,
    int64_t offset_b) {
  const char* op = "knn_sym";
  if (!b.has_value()) {
    // The general op's rules for knn(a, a, self_index = offset_a + arange(na) or none).
    c10::optional<at::Tensor> self;
    if (exclude_self && a.dim() == 2) {
      self = at::arange(offset_a, offset_a + a.size(0), a.options().dtype(at::kLong));
    }
    return check_knn_args(op, a, a, k, self, skip, prev_dist, prev_index, offset_a);
  }
  TORCH_CHECK_VALUE(skip == 0,
      op, "(): skip (drop_nearest) needs the whole set in one call (no b), got skip=", skip);
  TORCH_CHECK_VALUE(a.dim() == 2 && b->dim() == 2,
      op, "(): a and b must be 2-D [rows, D], got a ", shape_str(a), " and b ", shape_str(*b));
  const int64_t na = a.size(0);
  const int64_t nb = b->size(0);
  TORCH_CHECK_VALUE(offset_a >= 0 && offset_b >= 0,
      op, "(): offsets must be >= 0, got offset_a=", offset_a, " and offset_b=", offset_b);
  TORCH_CHECK_VALUE(offset_a + na <= offset_b || offset_b + nb <= offset_a,
      op, "(): the index ranges of a (", offset_a, "..", offset_a + na, ") and b (", offset_b,
      "..", offset_b + nb, ") must not overlap");
  const bool streaming = prev_dist.has_value() || prev_index.has_value();
  c10::optional<at::Tensor> pda, pia, pdb, pib;
  if (streaming) {
    TORCH_CHECK_VALUE(prev_dist.has_value() && prev_index.has_value(),
        op, "(): prev needs both the distances and the indices of the running top-k");
    TORCH_CHECK_VALUE(prev_dist->dim() == 2 && prev_dist->size(0) == na + nb &&
            prev_index->dim() == 2 && prev_index->size(0) == na + nb,
        op, "(): prev must have one row per row of a and b (", na + nb, "), got ",
        shape_str(*prev_dist), " and ", shape_str(*prev_index));
    pda = prev_dist->narrow(0, 0, na);
    pia = prev_index->narrow(0, 0, na);
    pdb = prev_dist->narrow(0, na, nb);
    pib = prev_index->narrow(0, na, nb);
  }
  const int64_t kk = check_knn_args(op, a, *b, k, c10::nullopt, 0, pda, pia, offset_b);
  check_knn_args(op, *b, a, k, c10::nullopt, 0, pdb, pib, offset_a);
  return kk;
}

int64_t check_knn_vote_args(
    const at::Tensor& queries,
    const at::Tensor& support,
    const at::Tensor& support_labels,
    int64_t k,
    int64_t num_classes,
    const c10::optional<at::Tensor>& self_index,
    int64_t skip) {
  const int64_t kk = check_knn_args(
      "knn_vote", queries, support, k, self_index, skip, c10::nullopt, c10::nullopt, 0);
  check_labels("knn_vote", "support_labels", support_labels, support.size(0), num_classes,
      support.device());
  return kk;
}

namespace {

// 1 <= num_classes <= MAX_CLASSES: each thread of a vote keeps one count per class.
void check_num_classes(const char* op, int64_t num_classes) {
  TORCH_CHECK_VALUE(num_classes >= 1, op, "(): num_classes must be >= 1, got ", num_classes);
  TORCH_CHECK_VALUE(num_classes <= kMaxClasses, op, "(): num_classes=", num_classes,
      " exceeds the limit of MAX_CLASSES=", kMaxClasses, " (a vote keeps one count per class)");
}

} // namespace

void check_labels(
    const char* op,
    const char* name,
    const at::Tensor& labels,
    int64_t n,
    int64_t num_classes,
    const at::Device& device) {
  check_num_classes(op, num_classes);
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n,
      op, "(): ", name, " must be 1-D with ", n, " entries, got shape ", shape_str(labels));
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong,
      op, "(): ", name, " must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.device() == device,
      op, "(): ", name, " must be on ", device, ", got ", labels.device());
  if (n > 0) {
    const int64_t lo = labels.min().item<int64_t>();
    const int64_t hi = labels.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < num_classes,
        op, "(): ", name, " must lie in [0, num_classes=", num_classes, "), got values in [",
        lo, ", ", hi, "]");
  }
}

void check_vote_args(const char* op, const at::Tensor& neighbor_labels, int64_t num_classes) {
  check_num_classes(op, num_classes);
  TORCH_CHECK_VALUE(neighbor_labels.dim() == 2 && neighbor_labels.size(1) >= 1,
      op, "(): neighbor_labels must be 2-D [M, k] with k >= 1, got shape ",
      shape_str(neighbor_labels));
  TORCH_CHECK_VALUE(neighbor_labels.scalar_type() == at::kLong,
      op, "(): neighbor_labels must be int64, got ", neighbor_labels.scalar_type());
  if (neighbor_labels.numel() > 0) {
    const int64_t lo = neighbor_labels.min().item<int64_t>();
    const int64_t hi = neighbor_labels.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < num_classes,
        op, "(): neighbor_labels must lie in [0, num_classes=", num_classes,
        ") or be -1 (a missing neighbour, which does not vote), got values in [", lo, ", ",
        hi, "]");
  }
}

std::pair<double, double> check_distance_range(
    const char* op, const at::Tensor& qn, const at::Tensor& sn) {
  const double qmax = qn.numel() > 0 ? qn.max().item<double>() : 0.0;
  const double smax = sn.numel() > 0 ? sn.max().item<double>() : 0.0;
  const double limit = qn.scalar_type() == at::kDouble
      ? std::numeric_limits<double>::max()
      : static_cast<double>(std::numeric_limits<float>::max());
  // 8 * (qmax + smax) <= limit, in a form that cannot overflow (limit / 8 is exact; a sum
  // that overflows double is inf and fails the test).
  TORCH_CHECK_VALUE(qmax + smax <= limit / 8,
      op, "(): ", (qmax >= smax ? "queries" : "support"), " has values too large for ",
      qn.scalar_type(), " squared distances: 8 * (max |q|^2 + max |s|^2) must not overflow ",
      qn.scalar_type(), ", got max |q|^2 = ", qmax, " (queries) and max |s|^2 = ", smax,
      " (support); rescale queries and support by a common factor");
  return {qmax, smax};
}

void check_finite_rows(
    const char* op, const char* name, const at::Tensor& sqnorms, int64_t first_row) {
  if (sqnorms.numel() == 0) {
    return;
  }
  const auto bad = at::logical_not(at::isfinite(sqnorms));
  if (bad.any().item<bool>()) {
    const int64_t row = first_row + bad.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK_VALUE(false,
        op, "(): ", name, " contains NaN or Inf (first at row ", row,
        "), or values whose squares overflow ", sqnorms.scalar_type());
  }
}

at::Tensor self_index_or_empty(const c10::optional<at::Tensor>& self_index) {
  return self_index.has_value() ? self_index->contiguous() : at::Tensor();
}

// The ops are not differentiable (a ranking: distances of selected pairs and integer
// indices). Their Autograd kernels run the op below autograd, so the outputs never require
// grad and never carry a grad_fn whose backward would silently do nothing.
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

std::tuple<at::Tensor, at::Tensor> knn_autograd(
    const at::Tensor& queries, const at::Tensor& support, int64_t k,
    const c10::optional<at::Tensor>& self_index, int64_t skip,
    const c10::optional<at::Tensor>& prev_dist, const c10::optional<at::Tensor>& prev_index,
    int64_t offset, c10::string_view filter) {
  static const auto op = op_handle<decltype(knn_autograd)>("pdepth::knn");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(queries, support, k, self_index, skip, prev_dist, prev_index, offset, filter);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> knn_vote_autograd(
    const at::Tensor& queries, const at::Tensor& support, const at::Tensor& support_labels,
    int64_t k, int64_t num_classes, const c10::optional<at::Tensor>& self_index,
    int64_t skip, c10::string_view filter) {
  static const auto op = op_handle<decltype(knn_vote_autograd)>("pdepth::knn_vote");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(queries, support, support_labels, k, num_classes, self_index, skip, filter);
}

std::tuple<at::Tensor, at::Tensor> knn_sym_autograd(
    const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t k, int64_t skip,
    bool exclude_self, const c10::optional<at::Tensor>& prev_dist,
    const c10::optional<at::Tensor>& prev_index, int64_t offset_a, int64_t offset_b,
    c10::string_view filter) {
  static const auto op = op_handle<decltype(knn_sym_autograd)>("pdepth::knn_sym");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(a, b, k, skip, exclude_self, prev_dist, prev_index, offset_a, offset_b,
      filter);
}

at::Tensor vote_autograd(const at::Tensor& neighbor_labels, int64_t num_classes) {
  static const auto op = op_handle<decltype(vote_autograd)>("pdepth::vote");
  const at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(neighbor_labels, num_classes);
}

} // namespace
} // namespace pdepth

// The schema, written once. Backends register with TORCH_LIBRARY_IMPL in cpu/ and cuda/.
TORCH_LIBRARY(pdepth, m) {
  // Running top-k: squared L2 distances [M, k] ascending (ties to the lower index) and
  // int64 support indices [M, k]. `skip` drops that many nearest (drop_nearest policy).
  // prev_dist/prev_index: a running top-k to merge this chunk into; chunk rows have global
  // indices offset..offset+N-1. `filter`: the GEMM format that filters candidates ("auto",
  // "fp32", "bf16", "bf16x3", "tf32"); it never changes the output.
  m.def(
      "knn(Tensor queries, Tensor support, int k, Tensor? self_index, int skip, "
      "Tensor? prev_dist, Tensor? prev_index, int offset, str filter=\"auto\") -> (Tensor, Tensor)");
  // Fused k-NN + uniform vote: (pred [M] int64, dist [M, k], index [M, k]).
  m.def(
      "knn_vote(Tensor queries, Tensor support, Tensor support_labels, int k, "
      "int num_classes, Tensor? self_index, int skip, str filter=\"auto\") -> "
      "(Tensor, Tensor, Tensor)");
  // Uniform vote over neighbour labels [M, k]: the most frequent, ties to the lowest class.
  // Labels -1 (empty slots of a stream) do not vote; a row without any votes -1.
  m.def("vote(Tensor neighbor_labels, int num_classes) -> Tensor");
  // The support set scored against itself, each pair's cross term and key once (CPU; docs/
  // design.md section 13). b absent: rows of a against a, global index offset_a + row, the
  // self pair skipped when exclude_self: knn(a, a, k, self_index, skip, prev, offset_a).
  // b given: a's rows against b and b's against a (disjoint index ranges), prev and the
  // output [na + nb, k] with a's rows first.
  m.def(
      "knn_sym(Tensor a, Tensor? b, int k, int skip, bool exclude_self, Tensor? prev_dist, "
      "Tensor? prev_index, int offset_a, int offset_b, str filter=\"auto\") -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pdepth, Autograd, m) {
  m.impl("knn", &pdepth::knn_autograd);
  m.impl("knn_vote", &pdepth::knn_vote_autograd);
  m.impl("vote", &pdepth::vote_autograd);
  m.impl("knn_sym", &pdepth::knn_sym_autograd);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "pdepth compiled k-NN ops (registered as torch.ops.pdepth.*)";
  m.def("build_info", []() {
    pybind11::dict info;
    info["torch_version"] = std::string(PDEPTH_TORCH_VERSION);
#ifdef PDEPTH_WITH_CUDA
    info["with_cuda"] = true;
    info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." +
        std::to_string((CUDA_VERSION % 1000) / 10);
    info["cuda_archs"] = std::string(PDEPTH_CUDA_ARCHS);
#else
    info["with_cuda"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_archs"] = std::string();
#endif
    // What the "auto" filter rests on (docs/design.md 6.5; pdepth.knn_plan for a given D).
    info["avx512_bf16"] = pdepth::cpu::has_avx512_bf16();
    info["amx_bf16"] = pdepth::cpu::has_amx_bf16();
    info["bf16_gemm"] = std::string(pdepth::cpu::bf16_gemm_name(pdepth::cpu::bf16_gemm()));
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    return info;
  });
  m.def("knn_stats", [](bool reset) {
    static const char* names[pdepth::kNumStats] = {"calls", "pairs", "candidates", "seeded_rows",
        "tiles", "fallback_tiles", "pairs_fp32", "pairs_bf16", "pairs_bf16x3", "pairs_tf32",
        "ns_gemm", "ns_norms", "ns_seeds", "ns_keys", "ns_select"};
    const std::vector<int64_t> v = pdepth::stats_read(reset);
    pybind11::dict out;
    for (int i = 0; i < pdepth::kNumStats; ++i) {
      out[names[i]] = v[i];
    }
    return out;
  }, pybind11::arg("reset") = false);
  m.def("knn_plan", [](int64_t d, const std::string& dtype, const std::string& device,
                        const std::string& filter) {
    const at::ScalarType st = dtype == "float64" ? at::kDouble : at::kFloat;
    const at::DeviceType dev = device == "cuda" ? at::kCUDA : at::kCPU;
    std::string why;
    const pdepth::Filter f = pdepth::resolve_filter("knn_plan", filter, dev, st, d, &why);
    const bool cuda = dev == at::kCUDA;
    const pdepth::FilterMargin fm = pdepth::filter_margin(f, d, st == at::kDouble, dev);
    pybind11::dict out;
    out["filter"] = std::string(pdepth::filter_name(f));
    out["reason"] = why;
    out["margin"] = fm.m;
    out["threshold_growth"] = fm.grow - 1.0;
    out["reduce_block"] = cuda ? pdepth::kCudaReduceBlock : pdepth::kReduceBlock;
    out["bf16_gemm"] = std::string(pdepth::cpu::bf16_gemm_name(pdepth::cpu::bf16_gemm()));
    out["fallback"] = f == pdepth::Filter::kFp32 ? std::string("none")
        : std::string("the next, more precise format per block when more than ") +
            std::to_string(pdepth::cpu::fallback_budget()) +
            " of the pairs of its first rows pass";
    return out;
  });
  m.def("_cpu_features", []() {
    pybind11::dict out;
    out["avx512_bf16"] = pdepth::cpu::has_avx512_bf16();
    out["amx_bf16"] = pdepth::cpu::has_amx_bf16();
    out["mkl_bf16"] = pdepth::cpu::mkl_bf16_available();
    return out;
  });
  m.def("_knn_test_hooks", [](const std::string& bf16_gemm, double fallback_budget,
                              bool exhaustive, int64_t wide_chunk_rows) {
    pdepth::cpu::set_bf16_gemm_override(bf16_gemm);
    pdepth::cpu::set_fallback_budget(fallback_budget);
    pdepth::cpu::set_exhaustive(exhaustive);
    pdepth::cpu::set_wide_chunk_rows(wide_chunk_rows);
  }, pybind11::arg("bf16_gemm") = "", pybind11::arg("fallback_budget") = -1.0,
     pybind11::arg("exhaustive") = false, pybind11::arg("wide_chunk_rows") = 0);
  m.def("_knn_low_chunk", &pdepth::cpu::set_low_chunk, pybind11::arg("on") = true,
        pybind11::arg("piece_rows") = 0);
  m.def("_gemm_bf16", &pdepth::cpu::gemm_bf16_for_test);
}
