// bfloat16 x bfloat16 -> float32 GEMM with AVX512-BF16 (see gemm_bf16.h for the contract).
//
// Structure (BLIS-like, single-threaded):
//   for each block of MC rows of A
//     for each block of KC pairs of k      (the float32 chain continues through c)
//       pack the A block into MR-row micro-panels (one dword = one bf16 pair per row)
//       for each 32-column panel of packed B
//         for each MR-row micro-panel: MR x 32 register tile, KC VDPBF16PS steps per zmm
// The register tile holds MR x 2 zmm accumulators; each step loads 2 B vectors and
// broadcasts one A dword per row (folded into VDPBF16PS as an embedded broadcast).
#include "gemm_bf16.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

#if defined(__x86_64__) && defined(__GNUC__) && \
    ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define PDEPTH_GEMM_BF16_X86 1
#include <cpuid.h>
#include <immintrin.h>
#else
#define PDEPTH_GEMM_BF16_X86 0
#endif

namespace pdepth {
namespace cpu {

namespace {

constexpr int64_t kNR = 32;  // columns per B panel (2 zmm of float32)
#ifndef PDEPTH_GEMM_BF16_MR
#define PDEPTH_GEMM_BF16_MR 14
#endif
#ifndef PDEPTH_GEMM_BF16_KC
#define PDEPTH_GEMM_BF16_KC 256
#endif
#ifndef PDEPTH_GEMM_BF16_MC
#define PDEPTH_GEMM_BF16_MC 112
#endif
constexpr int kMR = PDEPTH_GEMM_BF16_MR;     // rows per register tile
constexpr int64_t kKC = PDEPTH_GEMM_BF16_KC; // pairs per k block
constexpr int64_t kMC = (PDEPTH_GEMM_BF16_MC + kMR - 1) / kMR * kMR;  // rows per A block

inline uint16_t bits(const at::BFloat16& v) {
  return v.x;
}

#if PDEPTH_GEMM_BF16_X86
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

struct Features {
  bool avx512_bf16 = false;
  bool amx_bf16 = false;
  Features() {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d) || a < 7) return;
    __get_cpuid(1, &a, &b, &c, &d);
    const bool osxsave = (c >> 27) & 1;
    if (!osxsave) return;
    const uint64_t xcr0 = xgetbv0();
    unsigned a7, b7, c7, d7;
    __cpuid_count(7, 0, a7, b7, c7, d7);
    const unsigned subleaves = a7;
    unsigned a71 = 0, b71, c71, d71;
    if (subleaves >= 1) __cpuid_count(7, 1, a71, b71, c71, d71);
    // XCR0: SSE (1), AVX (2), opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7)
    const bool zmm_state = (xcr0 & 0xE6) == 0xE6;
    const bool f = (b7 >> 16) & 1, bw = (b7 >> 30) & 1, vl = (b7 >> 31) & 1;
    const bool bf16 = (a71 >> 5) & 1;
    avx512_bf16 = zmm_state && f && bw && vl && bf16;
    // AMX: CPUID.7.0:EDX bit 24 amx_tile, bit 22 amx_bf16; XCR0 bits 17, 18 (XTILECFG,
    // XTILEDATA). Linux also requires arch_prctl(ARCH_REQ_XCOMP_PERM) before first use.
    const bool tile = (d7 >> 24) & 1, amxbf = (d7 >> 22) & 1;
    const bool tile_state = ((xcr0 >> 17) & 3) == 3;
    amx_bf16 = tile && amxbf && tile_state;
  }
};

const Features& features() {
  static const Features f;
  return f;
}
#endif

}  // namespace

bool has_avx512_bf16() {
#if PDEPTH_GEMM_BF16_X86
  return features().avx512_bf16;
#else
  return false;
#endif
}

bool has_amx_bf16() {
#if PDEPTH_GEMM_BF16_X86
  return features().amx_bf16;
#else
  return false;
#endif
}

void pack_b(const at::BFloat16* b, int64_t ldb, int64_t n, int64_t k, PackedB& out) {
  TORCH_CHECK(n >= 0 && k >= 0, "pack_b: negative shape");
  const int64_t k2 = (k + 1) / 2;
  const int64_t panels = (n + kNR - 1) / kNR;
  out.n = n;
  out.k = k;
  out.data.assign(static_cast<size_t>(panels * k2 * kNR * 2), 0);
  uint16_t* dst = out.data.data();
  const int64_t full = k / 2;  // complete pairs
  constexpr int64_t kQB = 64;  // pairs per tile: a 32 x 64 dword tile (8 KiB) stays in L1
  // Panels are independent: at::parallel_for runs inline inside an outer parallel region.
  at::parallel_for(0, panels, (k2 * kNR >= (1 << 16)) ? 1 : panels, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kNR, jn = std::min(kNR, n - j0);
      uint16_t* panel = dst + p * k2 * kNR * 2;
      for (int64_t q0 = 0; q0 < k2; q0 += kQB) {
        const int64_t q1 = std::min(k2, q0 + kQB), qf = std::min(q1, full);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const at::BFloat16* row = b + (j0 + jj) * ldb;
          uint16_t* col = panel + 2 * jj;
          for (int64_t q = q0; q < qf; ++q) {
            std::memcpy(col + q * kNR * 2, row + 2 * q, 4);  // (b[2q], b[2q+1]) as stored
          }
          if (qf < q1) col[qf * kNR * 2] = bits(row[2 * qf]);  // odd k: zero high half
        }
      }
    }
  });
}

#if PDEPTH_GEMM_BF16_X86
namespace {

#define PDEPTH_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Packs rows [0, rows) of a (rows <= kMC), pairs [q0, q0 + kc) into micro-panels of kMR rows:
// buf[(r / kMR) * kc * kMR + q * kMR + r % kMR] = (a[r][2(q0+q)], a[r][2(q0+q)+1]), zero past
// k and past `rows` (up to a multiple of kMR).
void pack_a(const at::BFloat16* a, int64_t lda, int64_t rows, int64_t k, int64_t q0, int64_t kc,
            uint32_t* buf) {
  const int64_t rows_padded = (rows + kMR - 1) / kMR * kMR;
  const int64_t d0 = 2 * q0, d1 = std::min(k, 2 * (q0 + kc));
  const int64_t full = (d1 - d0) / 2;  // complete pairs
  for (int64_t r = 0; r < rows_padded; ++r) {
    uint32_t* dst = buf + (r / kMR) * kc * kMR + (r % kMR);
    if (r >= rows) {
      for (int64_t q = 0; q < kc; ++q) dst[q * kMR] = 0;
      continue;
    }
    const at::BFloat16* row = a + r * lda + d0;
    int64_t q = 0;
    for (; q < full; ++q) std::memcpy(dst + q * kMR, row + 2 * q, 4);  // little-endian pair
    if (q < kc && d0 + 2 * q < d1) {  // odd k: last pair padded with zero
      dst[q * kMR] = bits(row[2 * q]);
      ++q;
    }
    for (; q < kc; ++q) dst[q * kMR] = 0;
  }
}

// MR x 32 tile: c[r][0..32) (= or +=) sum over kc pairs. `rows` <= MR valid rows, masks for
// the two 16-column halves.
template <int MR>
PDEPTH_BF16_TARGET inline void micro_kernel(const uint32_t* __restrict ap,
                                            const uint16_t* __restrict bp, int64_t kc,
                                            float* __restrict c, int64_t ldc, int rows,
                                            __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 acc0[MR], acc1[MR];
  if (accumulate) {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      if (r < rows) {
        acc0[r] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
        acc1[r] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
      } else {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
      }
    }
  } else {
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      acc0[r] = _mm512_setzero_ps();
      acc1[r] = _mm512_setzero_ps();
    }
  }
  for (int64_t q = 0; q < kc; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 32);
    _mm_prefetch(reinterpret_cast<const char*>(bp + 64 * 8), _MM_HINT_T0);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], b0, av);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], b1, av);
    }
    ap += MR;
    bp += 64;
  }
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r) {
    if (r < rows) {
      _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
      _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
    }
  }
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

}  // namespace

PDEPTH_BF16_TARGET void gemm_bf16_packed(const at::BFloat16* a, int64_t lda, int64_t m,
                                         const PackedB& b, float* c, int64_t ldc) {
  const int64_t n = b.n, k = b.k;
  if (m <= 0 || n <= 0) return;
  TORCH_CHECK(has_avx512_bf16(), "gemm_bf16_packed: this CPU has no usable AVX512-BF16");
  const int64_t k2 = (k + 1) / 2;
  if (k2 == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const int64_t panels = (n + kNR - 1) / kNR;
  const int64_t kc_max = std::min(kKC, k2);
  // Thread-local A buffer: kMC rows x kc_max pairs.
  thread_local std::unique_ptr<uint32_t, AlignedFree> buf;
  thread_local size_t buf_size = 0;
  const size_t need = static_cast<size_t>(kMC * kc_max) * sizeof(uint32_t);
  if (buf_size < need) {
    const size_t bytes = (need + 63) / 64 * 64;
    buf.reset(static_cast<uint32_t*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(buf, "gemm_bf16_packed: out of memory");
    buf_size = bytes;
  }
  uint32_t* abuf = buf.get();
  const uint16_t* bdata = b.data.data();

  for (int64_t i0 = 0; i0 < m; i0 += kMC) {
    const int64_t mc = std::min(kMC, m - i0);
    for (int64_t q0 = 0; q0 < k2; q0 += kKC) {
      const int64_t kc = std::min(kKC, k2 - q0);
      pack_a(a + i0 * lda, lda, mc, k, q0, kc, abuf);
      const bool accumulate = q0 > 0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t j0 = p * kNR, jn = std::min(kNR, n - j0);
        const __mmask16 m0 = jn >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << jn) - 1);
        const __mmask16 m1 =
            jn >= 32 ? 0xFFFF : (jn <= 16 ? 0 : static_cast<__mmask16>((1u << (jn - 16)) - 1));
        const uint16_t* bp = bdata + (p * k2 + q0) * kNR * 2;
        for (int64_t r0 = 0; r0 < mc; r0 += kMR) {
          const int rows = static_cast<int>(std::min<int64_t>(kMR, mc - r0));
          micro_kernel<kMR>(abuf + r0 * kc, bp, kc, c + (i0 + r0) * ldc + j0, ldc, rows, m0, m1,
                            accumulate);
        }
      }
    }
  }
}

#else  // !PDEPTH_GEMM_BF16_X86

void gemm_bf16_packed(const at::BFloat16*, int64_t, int64_t, const PackedB&, float*, int64_t) {
  TORCH_CHECK(false, "gemm_bf16_packed: built without AVX512-BF16 support");
}

#endif

at::Tensor gemm_bf16_for_test(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2, "gemm_bf16: a and b must be 2-D");
  TORCH_CHECK(a_in.scalar_type() == at::kBFloat16 && b_in.scalar_type() == at::kBFloat16,
              "gemm_bf16: a and b must be bfloat16");
  TORCH_CHECK(a_in.device().is_cpu() && b_in.device().is_cpu(), "gemm_bf16: CPU tensors only");
  TORCH_CHECK(a_in.size(1) == b_in.size(1), "gemm_bf16: a is [m, k] and b is [n, k]; got k = ",
              a_in.size(1), " and ", b_in.size(1));
  TORCH_CHECK(has_avx512_bf16(), "gemm_bf16: this CPU has no usable AVX512-BF16");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return c;
  PackedB packed;
  pack_b(b.data_ptr<at::BFloat16>(), k, n, k, packed);
  const at::BFloat16* ap = a.data_ptr<at::BFloat16>();
  float* cp = c.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    gemm_bf16_packed(ap + begin * k, k, end - begin, packed, cp + begin * n, n);
  });
  return c;
}

}  // namespace cpu
}  // namespace pdepth
