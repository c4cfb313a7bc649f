// CPU filter GEMMs (filter_gemm.h): fp32 through ATen (MKL / OpenBLAS), bf16 and bf16x3
// through pdepth's AVX512-BF16 kernel, MKL's bf16 GEMM or float32 sgemm on widened values.
#include "filter_gemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <type_traits>

// MKL's bfloat16 GEMM with float32 output (LP64 interface), exported by torch's
// libtorch_cpu on x86 builds. Weak: absent elsewhere, and then never called.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
    float alpha, const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
    int ldc) __attribute__((weak));

namespace pdepth {
namespace cpu {
namespace {

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

std::mutex hook_mutex;
std::string bf16_override;                 // guarded by hook_mutex
std::atomic<double> budget_fraction{-1.0};  // < 0: default
std::atomic<bool> exhaustive_on{false};
std::atomic<int64_t> chunk_rows{0};
std::atomic<bool> low_chunk_on{true};
std::atomic<int64_t> low_piece_rows{0};

// Support rows per work unit of low_chunk_dot: its packed bfloat16 block (1 MiB per
// kReduceBlock, read in slices of the kernel's k block) stays near the core while the query
// piece's rows stream past it.
constexpr int64_t kLowTile = 512;
// ... and at least this many (fewer: the per-piece path, whose pieces balance the threads).
constexpr int64_t kLowMinTile = 128;
// low_chunk_dot's query pieces: at most this many bytes in the filter format (the size of
// the wide path's chunk of cross terms), but at least kLowRows rows (each support block is
// converted once per piece: 1/(2 kLowRows) conversions per flop at worst).
constexpr int64_t kLowBytes = int64_t(64) << 20;
constexpr int64_t kLowRows = 256;

// Columns of reduction block j in the format's row layout (bf16x3 rows are 3x as wide).
struct Block {
  int64_t off;
  int64_t len;
};

int64_t block_count(int64_t d) {
  return std::max<int64_t>(1, (d + kReduceBlock - 1) / kReduceBlock);
}

Block block_cols(Filter f, int64_t d, int64_t j) {
  const int64_t w = f == Filter::kBf16x3 ? 3 : 1;
  const int64_t off = j * kReduceBlock;
  return Block{w * off, w * std::min(kReduceBlock, d - off)};
}

const uint16_t* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>());
}

// One block's GEMM for rows m0..m0+mb into c (row stride nb), overwriting c.
template <typename T>
void block_gemm(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                int64_t j, T* c) {
  const int64_t d = q.rows.size(1);
  const int64_t nb = s.rows.size(0);
  const Block b = block_cols(f, d, j);
  const auto out_of = [&](at::ScalarType dt) {
    return at::from_blob(c, {mb, nb}, at::TensorOptions().dtype(dt));
  };
  if constexpr (std::is_same_v<T, double>) {
    at::Tensor o = out_of(at::kDouble);
    at::mm_out(o, q.rows.narrow(0, m0, mb).narrow(1, b.off, b.len),
        s.rows.narrow(1, b.off, b.len).t());
  } else {
    if (f == Filter::kFp32) {
      at::Tensor o = out_of(at::kFloat);
      at::mm_out(o, q.rows.narrow(0, m0, mb).narrow(1, b.off, b.len),
          s.rows.narrow(1, b.off, b.len).t());
      return;
    }
    const int64_t lda = q.low.size(1);
    const at::BFloat16* a = q.low.const_data_ptr<at::BFloat16>() + m0 * lda + b.off;
    switch (s.gemm) {
      case Bf16Gemm::kKernel:
        if (at::in_parallel_region() || mb < 64) {
          gemm_bf16_packed(a, lda, mb, s.packed[j], c, nb);
        } else {
          at::parallel_for(0, (mb + 15) / 16, 1, [&](int64_t r0, int64_t r1) {
            const int64_t i0 = r0 * 16;
            const int64_t i1 = std::min(mb, r1 * 16);
            gemm_bf16_packed(a + i0 * lda, lda, i1 - i0, s.packed[j], c + i0 * nb, nb);
          });
        }
        return;
      case Bf16Gemm::kMkl: {
        const int64_t ldb = s.low.size(1);
        cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, kCblasTrans,
            static_cast<int>(mb), static_cast<int>(nb), static_cast<int>(b.len), 1.0f,
            reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
            bf16_ptr(s.low) + b.off, static_cast<int>(ldb), 0.0f, c, static_cast<int>(nb));
        return;
      }
      case Bf16Gemm::kSgemm: {
        at::Tensor o = out_of(at::kFloat);
        at::mm_out(o, q.low.narrow(0, m0, mb).narrow(1, b.off, b.len).to(at::kFloat),
            s.low.narrow(1, b.off, b.len).to(at::kFloat).t());
        return;
      }
    }
  }
}

template <typename T>
void filter_dot_impl(Filter f, const FilterRows& q, int64_t m0, int64_t mb,
                     const FilterRows& s, T* out) {
  const int64_t nblocks = block_count(q.rows.size(1));
  const int64_t len = mb * s.rows.size(0);
  block_gemm<T>(f, q, m0, mb, s, 0, out);
  if (nblocks == 1) {
    return;
  }
  // Later blocks are summed into the first one by one, in order: one rounding each. The
  // buffer is the thread's own and kept (a fresh one per call costs page faults).
  thread_local std::vector<T> tmp;
  if (static_cast<int64_t>(tmp.size()) < len) {
    tmp.resize(len);
  }
  for (int64_t j = 1; j < nblocks; ++j) {
    block_gemm<T>(f, q, m0, mb, s, j, tmp.data());
    for (int64_t e = 0; e < len; ++e) {
      out[e] += tmp[e];
    }
  }
}

} // namespace

bool mkl_bf16_available() {
  return cblas_gemm_bf16bf16f32 != nullptr;
}

Bf16Gemm bf16_gemm() {
  {
    const std::lock_guard<std::mutex> lock(hook_mutex);
    if (bf16_override == "kernel" && has_avx512_bf16()) {
      return Bf16Gemm::kKernel;
    }
    if (bf16_override == "mkl" && mkl_bf16_available()) {
      return Bf16Gemm::kMkl;
    }
    if (bf16_override == "sgemm") {
      return Bf16Gemm::kSgemm;
    }
  }
  // AMX: MKL drives the tile units; AVX512-BF16 alone: pdepth's kernel (MKL runs bf16 at the
  // float32 rate there); neither: widened sgemm.
  if (has_amx_bf16() && mkl_bf16_available()) {
    return Bf16Gemm::kMkl;
  }
  if (has_avx512_bf16()) {
    return Bf16Gemm::kKernel;
  }
  return mkl_bf16_available() ? Bf16Gemm::kMkl : Bf16Gemm::kSgemm;
}

const char* bf16_gemm_name(Bf16Gemm g) {
  switch (g) {
    case Bf16Gemm::kKernel:
      return "avx512_bf16 kernel";
    case Bf16Gemm::kMkl:
      return "mkl cblas_gemm_bf16bf16f32";
    case Bf16Gemm::kSgemm:
      return "float32 sgemm on bfloat16 values";
  }
  return "?";
}

void set_bf16_gemm_override(const std::string& name) {
  TORCH_CHECK_VALUE(name.empty() || name == "kernel" || name == "mkl" || name == "sgemm",
      "_knn_test_hooks(): bf16_gemm must be '', 'kernel', 'mkl' or 'sgemm', got '", name, "'");
  TORCH_CHECK_VALUE(name != "kernel" || has_avx512_bf16(),
      "_knn_test_hooks(): this CPU has no AVX512-BF16 for the bf16 kernel");
  TORCH_CHECK_VALUE(name != "mkl" || mkl_bf16_available(),
      "_knn_test_hooks(): MKL's cblas_gemm_bf16bf16f32 is not available in this torch");
  const std::lock_guard<std::mutex> lock(hook_mutex);
  bf16_override = name;
}

void set_fallback_budget(double pairs_fraction) {
  budget_fraction.store(pairs_fraction);
}

void set_exhaustive(bool on) {
  exhaustive_on.store(on);
}

bool exhaustive() {
  return exhaustive_on.load();
}

void set_wide_chunk_rows(int64_t rows) {
  chunk_rows.store(rows);
}

void set_low_chunk(bool on, int64_t piece_rows) {
  low_chunk_on.store(on);
  low_piece_rows.store(piece_rows);
}

int64_t wide_chunk_rows() {
  return chunk_rows.load();
}

double fallback_budget() {
  const double b = budget_fraction.load();
  // Default: a tile falls back when more than 1/8 of its pairs are candidates; a canonical
  // key costs about as much as 4-8 pairs of fp32 GEMM, so past that the recomputation pays.
  return b < 0 ? 0.125 : b;
}

namespace {

// `t` as an uninitialised tensor of this shape and dtype, reusing its storage when it has
// them already (a fresh buffer per tile costs page faults).
void reuse(at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  if (!t.defined() || t.sizes() != shape || t.scalar_type() != dtype) {
    t = at::empty(shape, at::TensorOptions().dtype(dtype));
  }
}

} // namespace

// The bfloat16 form of one reduction block of centred rows `in` [r, len] (float32, any
// strides) into `out`: bf16 -> [r, len] rounded to nearest even; bf16x3 -> [r, 3 len], per
// row [hi|hi|lo] (queries) or [hi|lo|hi] (support), hi = bf16(x), lo = bf16(x - hi), with
// `res` [r, len] float32 scratch for the residual. ATen's conversions (vectorised).
namespace {

void low_block(Filter f, const at::Tensor& in, bool support_side, const at::Tensor& out,
               at::Tensor res) {
  if (f == Filter::kBf16) {
    out.copy_(in);
    return;
  }
  const int64_t len = in.size(1);
  const at::Tensor hi = out.narrow(1, 0, len);
  hi.copy_(in);
  res.copy_(hi);
  at::sub_out(res, in, res);  // the residual x - hi, exact in float32
  out.narrow(1, len, len).copy_(support_side ? res : hi);
  out.narrow(1, 2 * len, len).copy_(support_side ? hi : res);
}

} // namespace

void filter_rows(Filter f, const at::Tensor& centred, bool support_side, FilterRows& out) {
  out.rows = centred;
  out.gemm = bf16_gemm();
  if (f == Filter::kFp32) {
    return;
  }
  const int64_t r = centred.size(0);
  const int64_t d = centred.size(1);
  reuse(out.low, {r, f == Filter::kBf16x3 ? 3 * d : d}, at::kBFloat16);
  if (f == Filter::kBf16x3) {
    reuse(out.residual, {r, std::min(kReduceBlock, d)}, centred.scalar_type());
  }
  for (int64_t j = 0; j < block_count(d); ++j) {
    const int64_t off = j * kReduceBlock;
    const int64_t len = std::min(kReduceBlock, d - off);
    const Block b = block_cols(f, d, j);
    low_block(f, centred.narrow(1, off, len), support_side, out.low.narrow(1, b.off, b.len),
        f == Filter::kBf16x3 ? out.residual.narrow(1, 0, len) : at::Tensor());
  }
  if (support_side && out.gemm == Bf16Gemm::kKernel) {
    const int64_t ld = out.low.size(1);
    out.packed.resize(block_count(d));
    for (int64_t j = 0; j < block_count(d); ++j) {
      const Block b = block_cols(f, d, j);
      pack_b(out.low.const_data_ptr<at::BFloat16>() + b.off, ld, r, b.len, out.packed[j]);
    }
  }
}

namespace {

// Rows [r, off, off + len) of x (row stride d) minus c (c null: no shift), rounded to T:
// [r, len] in dst.
template <typename T>
void centre_block(const T* x, int64_t r, int64_t d, const T* c, int64_t off, int64_t len,
                  T* dst) {
  for (int64_t i = 0; i < r; ++i) {
    const T* src = x + i * d + off;
    T* o = dst + i * len;
    if (c == nullptr) {
      std::copy(src, src + len, o);
      continue;
    }
    for (int64_t j = 0; j < len; ++j) {
      o[j] = src[j] - c[off + j];
    }
  }
}

// w.sl [ns, lw] = the support block w.sf [ns, len] (float32) in format f (bf16 / bf16x3;
// lw = len or 3 len).
void support_low(Filter f, int64_t ns, int64_t len, CentredScratch<float>& w) {
  const int64_t lw = f == Filter::kBf16x3 ? 3 * len : len;
  w.sl.resize(ns * lw);
  w.res.resize(std::max<int64_t>(w.res.size(), ns * len));
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  low_block(f, at::from_blob(w.sf.data(), {ns, len}, f32), true,
      at::from_blob(w.sl.data(), {ns, lw}, bf16), at::from_blob(w.res.data(), {ns, len}, f32));
}

// prod [mq, ns] = a [mq, lw] (row stride lda) times the support block w.sl [ns, lw]
// (bfloat16), overwritten.
void low_product(const at::BFloat16* a, int64_t lda, int64_t mq, int64_t ns, int64_t lw,
                 CentredScratch<float>& w) {
  switch (bf16_gemm()) {
    case Bf16Gemm::kKernel:
      pack_b(w.sl.data(), lw, ns, lw, w.packed);
      gemm_bf16_packed(a, lda, mq, w.packed, w.prod.data(), ns);
      return;
    case Bf16Gemm::kMkl:
      cblas_gemm_bf16bf16f32(kCblasRowMajor, kCblasNoTrans, kCblasTrans,
          static_cast<int>(mq), static_cast<int>(ns), static_cast<int>(lw), 1.0f,
          reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
          reinterpret_cast<const uint16_t*>(w.sl.data()), static_cast<int>(lw), 0.0f,
          w.prod.data(), static_cast<int>(ns));
      return;
    case Bf16Gemm::kSgemm: {
      const auto f32 = at::TensorOptions().dtype(at::kFloat);
      const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
      at::Tensor o = at::from_blob(w.prod.data(), {mq, ns}, f32);
      at::mm_out(o, at::from_blob(const_cast<at::BFloat16*>(a), {mq, lw}, {lda, 1}, bf16)
                        .to(at::kFloat),
          at::from_blob(w.sl.data(), {ns, lw}, bf16).to(at::kFloat).t());
      return;
    }
  }
}

// centre_block and the bfloat16 conversion (round to nearest even, as ATen's copy_) in one
// pass: dst [r, len] = bf16(fl(x - c)), the bits of centre_block then low_block.
void centre_bf16_block(const float* x, int64_t r, int64_t d, const float* c, int64_t off,
                       int64_t len, at::BFloat16* dst) {
  for (int64_t i = 0; i < r; ++i) {
    const float* src = x + i * d + off;
    at::BFloat16* o = dst + i * len;
    if (c == nullptr) {
      for (int64_t j = 0; j < len; ++j) {
        o[j] = at::BFloat16(src[j]);
      }
      continue;
    }
    for (int64_t j = 0; j < len; ++j) {
      o[j] = at::BFloat16(src[j] - c[off + j]);
    }
  }
}

// prod [mq, ns] = the block's product in format f (overwritten).
template <typename T>
void block_product(Filter f, int64_t mq, int64_t ns, int64_t len, CentredScratch<T>& w) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor o = at::from_blob(w.prod.data(), {mq, ns}, opts);
  if (std::is_same_v<T, double> || f == Filter::kFp32) {
    at::mm_out(o, at::from_blob(w.qf.data(), {mq, len}, opts),
        at::from_blob(w.sf.data(), {ns, len}, opts).t());
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    const int64_t lw = f == Filter::kBf16x3 ? 3 * len : len;
    w.ql.resize(mq * lw);
    w.res.resize(std::max(mq, ns) * len);
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
    low_block(f, at::from_blob(w.qf.data(), {mq, len}, f32), false,
        at::from_blob(w.ql.data(), {mq, lw}, bf16), at::from_blob(w.res.data(), {mq, len}, f32));
    support_low(f, ns, len, w);
    low_product(w.ql.data(), lw, mq, ns, lw, w);
  }
}

// Adds the block product w.prod [mq, ns] to out (row stride ldo): block 0 is copied, later
// blocks are summed into it one by one, in order.
template <typename T>
void add_block(int64_t j, int64_t mq, int64_t ns, const CentredScratch<T>& w, T* out,
               int64_t ldo) {
  for (int64_t i = 0; i < mq; ++i) {
    T* o = out + i * ldo;
    const T* p = w.prod.data() + i * ns;
    if (j == 0) {
      std::copy(p, p + ns, o);
    } else {
      for (int64_t e = 0; e < ns; ++e) {
        o[e] += p[e];
      }
    }
  }
}

template <typename T>
void centred_dot_impl(Filter f, const T* q, int64_t mq, const T* s, int64_t ns, const T* c,
                      int64_t d, T* out, int64_t ldo, CentredScratch<T>& w) {
  const int64_t len0 = std::min(kReduceBlock, d);
  w.qf.resize(mq * len0);
  w.sf.resize(ns * len0);
  w.prod.resize(mq * ns);
  for (int64_t j = 0; j < block_count(d); ++j) {
    const int64_t off = j * kReduceBlock;
    const int64_t len = std::min(kReduceBlock, d - off);
    if (c == nullptr && (std::is_same_v<T, double> || f == Filter::kFp32)) {
      // Unshifted rows in the compute dtype: the GEMM reads the inputs as they are.
      const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
      at::Tensor o = at::from_blob(w.prod.data(), {mq, ns}, opts);
      at::mm_out(o, at::from_blob(const_cast<T*>(q) + off, {mq, len}, {d, 1}, opts),
          at::from_blob(const_cast<T*>(s) + off, {ns, len}, {d, 1}, opts).t());
    } else {
      centre_block(q, mq, d, c, off, len, w.qf.data());
      centre_block(s, ns, d, c, off, len, w.sf.data());
      block_product(f, mq, ns, len, w);
    }
    add_block(j, mq, ns, w, out, ldo);
  }
}

// The query rows q [mq, D] centred and in format f (bf16 / bf16x3), reduction block by
// block in FilterRows::low's layout: `out` [mq, D'] bfloat16. Parallel over rows; the same
// conversions as block_product's, so the same bits.
void centred_low(Filter f, const float* q, int64_t mq, const float* c, int64_t d,
                 at::Tensor& out) {
  const int64_t width = f == Filter::kBf16x3 ? 3 * d : d;
  reuse(out, {mq, width}, at::kBFloat16);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::parallel_for(0, mq, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> cen, res;
    for (int64_t j = 0; j < block_count(d); ++j) {
      const int64_t off = j * kReduceBlock;
      const int64_t len = std::min(kReduceBlock, d - off);
      const Block b = block_cols(f, d, j);
      cen.resize((r1 - r0) * len);
      res.resize((r1 - r0) * len);
      centre_block(q + r0 * d, r1 - r0, d, c, off, len, cen.data());
      low_block(f, at::from_blob(cen.data(), {r1 - r0, len}, f32), false,
          out.narrow(0, r0, r1 - r0).narrow(1, b.off, b.len),
          at::from_blob(res.data(), {r1 - r0, len}, f32));
    }
  });
}

// centred_dot's product with the query side already converted: rows of `ql` (centred_low's
// layout, row stride lda) against support rows s [ns, D], each support block centred and
// converted once for all mq rows.
void centred_dot_low(Filter f, const at::BFloat16* ql, int64_t lda, int64_t mq, const float* s,
                     int64_t ns, const float* c, int64_t d, float* out, int64_t ldo,
                     CentredScratch<float>& w) {
  w.sf.resize(ns * std::min(kReduceBlock, d));
  w.prod.resize(mq * ns);
  for (int64_t j = 0; j < block_count(d); ++j) {
    const int64_t off = j * kReduceBlock;
    const int64_t len = std::min(kReduceBlock, d - off);
    const Block b = block_cols(f, d, j);
    if (f == Filter::kBf16) {
      w.sl.resize(ns * len);
      centre_bf16_block(s, ns, d, c, off, len, w.sl.data());
    } else {
      centre_block(s, ns, d, c, off, len, w.sf.data());
      support_low(f, ns, len, w);
    }
    low_product(ql + b.off, lda, mq, ns, b.len, w);
    add_block(j, mq, ns, w, out, ldo);
  }
}

} // namespace

void centred_dot(Filter f, const float* q, int64_t mq, const float* s, int64_t ns,
                 const float* c, int64_t d, float* out, int64_t ldo,
                 CentredScratch<float>& w) {
  centred_dot_impl(f, q, mq, s, ns, c, d, out, ldo, w);
}

void centred_dot(Filter f, const double* q, int64_t mq, const double* s, int64_t ns,
                 const double* c, int64_t d, double* out, int64_t ldo,
                 CentredScratch<double>& w) {
  centred_dot_impl(f, q, mq, s, ns, c, d, out, ldo, w);
}

bool low_chunk_dot(Filter f, const float* q, int64_t mq, const float* s, int64_t n,
                   const float* c, int64_t d, float* out, int64_t ldo) {
  // Units of at most kLowTile support rows, at least two per thread (whole 32-row panels).
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max((n + kLowTile - 1) / kLowTile, 2 * threads);
  const int64_t tile = ((n + want - 1) / want + 31) / 32 * 32;
  const int64_t units = (n + tile - 1) / tile;
  if (f == Filter::kFp32 || tile < kLowMinTile || at::in_parallel_region() ||
      !low_chunk_on.load()) {
    return false;
  }
  // Query pieces of at most kLowBytes in the format (at least kLowRows rows).
  const int64_t width = f == Filter::kBf16x3 ? 3 * d : d;
  const int64_t rows = low_piece_rows.load() > 0 ? low_piece_rows.load()
      : std::min(mq, std::max<int64_t>(
            kLowRows, kLowBytes / (width * static_cast<int64_t>(sizeof(at::BFloat16)))));
  at::Tensor ql;
  for (int64_t i0 = 0; i0 < mq; i0 += rows) {
    const int64_t mr = std::min(rows, mq - i0);
    centred_low(f, q + i0 * d, mr, c, d, ql);
    const at::BFloat16* a = ql.const_data_ptr<at::BFloat16>();
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
      thread_local CentredScratch<float> w;  // kept: no page faults per chunk
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t j0 = u * tile;
        centred_dot_low(f, a, width, mr, s + j0 * d, std::min(tile, n - j0), c, d,
            out + i0 * ldo + j0, ldo, w);
      }
    });
  }
  return true;
}

bool low_chunk_dot(Filter, const double*, int64_t, const double*, int64_t, const double*,
                   int64_t, double*, int64_t) {
  return false;
}

void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                float* out) {
  filter_dot_impl<float>(f, q, m0, mb, s, out);
}

void filter_dot(Filter f, const FilterRows& q, int64_t m0, int64_t mb, const FilterRows& s,
                double* out) {
  filter_dot_impl<double>(f, q, m0, mb, s, out);
}

} // namespace cpu
} // namespace pdepth
