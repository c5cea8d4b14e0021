// The micro-kernels of conv_gemm.h, one per instruction set, and the run-time choice among them.
//
// conv_gemm_tile.inc holds the kernel once; it is included below inside one namespace per ISA
// whose functions all carry that ISA's target attribute (a "target region": GCC's
// `#pragma GCC target`, Clang's `#pragma clang attribute`), so only the functions of that
// region use its instructions and the library still loads and runs on any x86-64. Every header
// is included before the first region: a header's inline functions compiled inside a region
// could otherwise be merged with their plain copies at link time and run on a CPU without it.
#include "conv_gemm.h"

#include <ATen/Version.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define DK_X86_KERNELS 1
#else
#define DK_X86_KERNELS 0
#endif

#define DK_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define DK_UNROLL DK_PRAGMA(unroll)
#define DK_TARGET_BEGIN(isa) DK_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define DK_TARGET_END DK_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define DK_UNROLL DK_PRAGMA(GCC unroll 16)
#define DK_TARGET_BEGIN(isa) DK_PRAGMA(GCC push_options) DK_PRAGMA(GCC target(isa))
#define DK_TARGET_END DK_PRAGMA(GCC pop_options)
#else
#define DK_UNROLL
#endif
#if defined(__GNUC__)
#define DK_PREFETCH(p) __builtin_prefetch(p)
#else
#define DK_PREFETCH(p)
#endif

namespace dynkernels {
namespace cpu_conv {
namespace {

// Portable C++: vectors of 8 lanes as plain arrays, which the compiler maps onto whatever
// vector unit the baseline target has.
namespace portable {

template <typename T_>
struct VecArray {
  using T = T_;
  static constexpr int L = 8, MR = 4, NV = 2;
  static constexpr int MR_COLUMNS = MR, NV_COLUMNS = NV;  // the same tile with channels in the lanes
  static constexpr bool has_window = false, tiles_outer = false;
  struct Reg {
    T v[L];
  };
  using Tail = int;  // number of valid lanes
  static Tail tail(int n) { return n; }
  static Reg zero() { return set1(T(0)); }
  static Reg set1(T x) {
    Reg r;
    DK_UNROLL for (int l = 0; l < L; ++l) r.v[l] = x;
    return r;
  }
  static Reg load(const T* p) {
    Reg r;
    DK_UNROLL for (int l = 0; l < L; ++l) r.v[l] = p[l];
    return r;
  }
  static Reg load_tail(const T* p, Tail n) {
    Reg r = zero();
    for (int l = 0; l < n; ++l) r.v[l] = p[l];
    return r;
  }
  static void store(T* p, const Reg& r) {
    DK_UNROLL for (int l = 0; l < L; ++l) p[l] = r.v[l];
  }
  static void store_tail(T* p, const Reg& r, Tail n) {
    for (int l = 0; l < n; ++l) p[l] = r.v[l];
  }
  static Reg fma(const Reg& a, const Reg& b, const Reg& c) {
    Reg r;
    DK_UNROLL for (int l = 0; l < L; ++l) r.v[l] = a.v[l] * b.v[l] + c.v[l];
    return r;
  }
  static Reg add(const Reg& a, const Reg& b) {
    Reg r;
    DK_UNROLL for (int l = 0; l < L; ++l) r.v[l] = a.v[l] + b.v[l];
    return r;
  }
  static void transpose(Reg r[L]) {
    for (int a = 0; a < L; ++a)
      for (int b = a + 1; b < L; ++b) std::swap(r[a].v[b], r[b].v[a]);
  }
};
using VecF = VecArray<float>;
using VecD = VecArray<double>;

#include "conv_gemm_tile.inc"

}  // namespace portable

#if DK_X86_KERNELS
// AVX-512: 32 registers of 16 floats / 8 doubles; a 6 x 4 tile keeps 24 accumulators, 4
// pixel vectors and one broadcast weight live (measured on an AMD EPYC (Zen 4) for the 3x3
// layers of conv_gemm.h's use: 6 x 4 runs at 97% of the FMA peak, 4 x 6 at 94%, 8 x 3 at 92%,
// 4 x 4 at 80%; on an Intel Xeon (AVX-512, AMX), one 128 -> 128, 3x3, 16x16 sample, with
// unaligned buffers and a loop per input channel: 6 x 4 at 73%, 8 x 3 at 69%, 12 x 2, 10 x 2
// and 5 x 5 at 66%, 4 x 6 at 62%; aligned buffers and one flat loop brought 6 x 4 to 99%).
DK_TARGET_BEGIN("avx512f,fma,popcnt")
// GCC 12 warns of an uninitialised variable inside its own AVX-512 unpack intrinsics (the
// placeholder vector of _mm512_undefined_ps, a known false positive) where a transpose's registers
// are indexed at run time; the warning is about the header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace avx512 {

struct VecF {
  using T = float;
  using Reg = __m512;
  using Tail = __mmask16;
  static constexpr int L = 16, MR = 6, NV = 4;
  static constexpr int MR_COLUMNS = MR, NV_COLUMNS = NV;  // the same tile with channels in the lanes
  static constexpr bool has_window = true, tiles_outer = false;
  static Tail tail(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Tail lanes(unsigned bits) { return static_cast<__mmask16>(bits); }  // lane l where bit l is set
  using MaskStore = Tail;  // a mask as kept in tables
  static MaskStore to_store(Tail m) { return m; }
  static Tail from_store(MaskStore m) { return m; }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg set1(float x) { return _mm512_set1_ps(x); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load_tail(const float* p, Tail m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Reg r) { _mm512_storeu_ps(p, r); }
  static void store_tail(float* p, Reg r, Tail m) { _mm512_mask_storeu_ps(p, m, r); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  // Lanes s.. s + 15 of the 32 lanes prev, cur for 0 <= s <= 16, lanes 16 + s.. for -16 <= s < 0:
  // the 16 values s apart from the aligned window that starts L lanes before cur (s >= 0) or at
  // cur (s < 0), one two-source permute.
  // window_index(s) once per shift, window(prev, cur, index) per vector.
  // (Plain ints: a std::vector of __m512i would not keep their 64-byte alignment.)
  struct Index {
    int32_t lanes[16];
  };
  static Index window_index(int s) {
    Index index;
    for (int l = 0; l < 16; ++l) index.lanes[l] = l + (s < 0 ? s + 16 : s);
    return index;
  }
  static Reg window(Reg prev, Reg cur, const Index& index) {
    return _mm512_permutex2var_ps(prev, _mm512_loadu_si512(index.lanes), cur);
  }
  static Reg keep(Tail m, Reg r) { return _mm512_maskz_mov_ps(m, r); }
  // 16 x 16: pairs of rows interleaved (ps), then pairs of pairs (pd), then the 128-bit
  // quarters regrouped (two rounds of shuffle_f32x4): r[4l + m] ends up as column 4l + m.
  static void transpose(Reg r[16]) {
    Reg t[16];
    for (int k = 0; k < 8; ++k) {
      t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    Reg u[16];
    for (int g = 0; g < 4; ++g) {
      const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
      u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));      // column 0 (+4, +8, +12) of rows 4g..4g+3
      u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // column 1
      u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));  // column 2
      u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));  // column 3
    }
    for (int m = 0; m < 4; ++m) {
      const Reg v01 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), v23 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
      const Reg w01 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44), w23 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
      r[m] = _mm512_shuffle_f32x4(v01, w01, 0x88);
      r[4 + m] = _mm512_shuffle_f32x4(v01, w01, 0xDD);
      r[8 + m] = _mm512_shuffle_f32x4(v23, w23, 0x88);
      r[12 + m] = _mm512_shuffle_f32x4(v23, w23, 0xDD);
    }
  }
};

struct VecD {
  using T = double;
  using Reg = __m512d;
  using Tail = __mmask8;
  static constexpr int L = 8, MR = 6, NV = 4;
  static constexpr int MR_COLUMNS = MR, NV_COLUMNS = NV;  // the same tile with channels in the lanes
  static constexpr bool tiles_outer = false;
  static Tail tail(int n) { return static_cast<__mmask8>((1u << n) - 1u); }
  static Reg zero() { return _mm512_setzero_pd(); }
  static Reg set1(double x) { return _mm512_set1_pd(x); }
  static Reg load(const double* p) { return _mm512_loadu_pd(p); }
  static Reg load_tail(const double* p, Tail m) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, Reg r) { _mm512_storeu_pd(p, r); }
  static void store_tail(double* p, Reg r, Tail m) { _mm512_mask_storeu_pd(p, m, r); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_pd(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_pd(a, b); }
};

#include "conv_gemm_tile.inc"

// conv_gemm.h's compress_row and expand_row, 16 columns per register compress or expand
// (the register forms: the forms that write or read memory themselves are far slower on Zen 4).
void compress_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
  for (int64_t c0 = 0, b = 0; c0 < ncols; c0 += 16, ++b) {
    const __mmask16 m = mask[b];
    const __m512 v = c0 + 16 <= ncols ? _mm512_loadu_ps(src + c0) : _mm512_maskz_loadu_ps(m, src + c0);
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(m, v));  // whole: the next block overwrites the rest
    dst += _mm_popcnt_u32(m);
  }
}

void expand_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
  for (int64_t c0 = 0, b = 0; c0 < ncols; c0 += 16, ++b) {
    const __mmask16 m = mask[b];
    const __m512 v = _mm512_maskz_expand_ps(m, _mm512_loadu_ps(src));
    c0 + 16 <= ncols ? _mm512_storeu_ps(dst + c0, v)
                     : _mm512_mask_storeu_ps(dst + c0, static_cast<__mmask16>((1u << (ncols - c0)) - 1u), v);
    src += _mm_popcnt_u32(m);
  }
}

}  // namespace avx512
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
DK_TARGET_END

// AVX2 + FMA: 16 registers of 8 floats / 4 doubles; a 4 x 3 tile keeps 12 accumulators, 3
// pixel vectors and one broadcast weight live (on the same CPU: 78% of the FMA peak; 5 x 2:
// 73%, 4 x 2: 68%, 6 x 2 and 3 x 4 spill). On an AMD EPYC (Zen 2: 32 KiB L1d, 512 KiB L2 per
// core, AVX2 only) the tile alone, its data in L1, runs at 97% of the measured FMA peak (107
// GFLOP/s per core), but over a sample of the 128 -> 128, 3x3, 16x16 layer at output density 0.5
// it reached 72% with row blocks outside, the whole row-shift buffer (442 KB) read once per
// block, and 76% with pixel tiles outside (tiles_outer: a tile's 110 KB of it is read by every
// row block in turn), and 84 - 88% once the reduction walks even runs without reading the
// offset tables (GemmProblem::run: 7 loads per step of 12 FMAs instead of 9, which the load
// ports did not keep up with; software prefetches of b, two more per step, cost 12%). Blocking
// the reduction as well (its part of b in L1) gained 2 - 4% there before the even runs and lost
// 1.5 - 12% after them (64 - 384 pairs per block), so it is not done. With the roles swapped
// (per_column: pixels in rows, channels in the lanes) a 6 x 2 tile: 12 accumulators, 2 weight
// vectors and one broadcast pixel value; on Zen 2 the 4 x 3 tile ran that orientation at about
// 70 GFLOP/s on the benchmark layer, 6 x 2 at about 90 (its 64 active channels are 4 whole
// tiles of 2 vectors, where 4 x 3 splits them 3, 3, 2).
DK_TARGET_BEGIN("avx2,fma")
namespace avx2 {

struct VecF {
  using T = float;
  using Reg = __m256;
  using Tail = __m256i;
  static constexpr int L = 8, MR = 4, NV = 3;
  static constexpr int MR_COLUMNS = 6, NV_COLUMNS = 2;  // channels in the lanes (see above)
  static constexpr bool has_window = true, tiles_outer = true;
  static Tail tail(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static Tail lanes(unsigned bits) {  // lane l where bit l is set
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
  }
  // A mask as kept in tables: plain ints, since a std::vector of structs holding __m256i does
  // not keep their 32-byte alignment here (the aligned stores into one faulted).
  struct MaskStore {
    int32_t lanes[8];
  };
  static MaskStore to_store(Tail m) {
    MaskStore s;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.lanes), m);
    return s;
  }
  static Tail from_store(const MaskStore& s) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lanes)); }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg set1(float x) { return _mm256_set1_ps(x); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load_tail(const float* p, Tail m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, Reg r) { _mm256_storeu_ps(p, r); }
  static void store_tail(float* p, Reg r, Tail m) { _mm256_maskstore_ps(p, m, r); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  // The window of ShiftWindows (as AVX-512's): lanes s.. s + 7 of the 16 lanes prev, cur for
  // 0 <= s <= 8, lanes 8 + s.. for -8 <= s < 0; AVX2 has no two-source permute, so each source
  // is permuted on its own (vpermps reads the low 3 bits of an index) and the two blended.
  struct Index {
    int32_t lanes[8];
    int32_t from_cur[8];  // -1 where the lane comes from cur
  };
  static Index window_index(int s) {
    Index index;
    for (int l = 0; l < 8; ++l) {
      index.lanes[l] = l + (s < 0 ? s + 8 : s);
      index.from_cur[l] = index.lanes[l] >= 8 ? -1 : 0;
    }
    return index;
  }
  static Reg window(Reg prev, Reg cur, const Index& index) {
    const __m256i lanes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(index.lanes));
    const __m256 from_cur = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(index.from_cur)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(prev, lanes), _mm256_permutevar8x32_ps(cur, lanes), from_cur);
  }
  static Reg keep(Tail m, Reg r) { return _mm256_and_ps(_mm256_castsi256_ps(m), r); }
  // 8 x 8: pairs of rows interleaved, then pairs of pairs, then the 128-bit halves regrouped.
  static void transpose(Reg r[8]) {
    Reg t[8], u[8];
    for (int k = 0; k < 4; ++k) {
      t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
      t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int g = 0; g < 2; ++g) {
      u[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);      // column 0 (and 4) of rows 4g..4g+3
      u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);  // column 1 (and 5)
      u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
      r[m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x20);
      r[4 + m] = _mm256_permute2f128_ps(u[m], u[4 + m], 0x31);
    }
  }
};

struct VecD {
  using T = double;
  using Reg = __m256d;
  using Tail = __m256i;
  static constexpr int L = 4, MR = 4, NV = 3;
  static constexpr int MR_COLUMNS = MR, NV_COLUMNS = NV;  // the same tile with channels in the lanes
  static constexpr bool tiles_outer = true;
  static Tail tail(int n) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static Reg zero() { return _mm256_setzero_pd(); }
  static Reg set1(double x) { return _mm256_set1_pd(x); }
  static Reg load(const double* p) { return _mm256_loadu_pd(p); }
  static Reg load_tail(const double* p, Tail m) { return _mm256_maskload_pd(p, m); }
  static void store(double* p, Reg r) { _mm256_storeu_pd(p, r); }
  static void store_tail(double* p, Reg r, Tail m) { _mm256_maskstore_pd(p, m, r); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_pd(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_pd(a, b); }
};

#include "conv_gemm_tile.inc"

// conv_gemm.h's compress_row and expand_row, 8 columns per register permute (AVX2 has no
// compress or expand instruction): for each of the 256 lane masks, the permute that moves the
// active lanes to the front (compress) or back to their columns (expand), computed once.
struct LanePermutes {
  alignas(32) int32_t compress[256][8];
  alignas(32) int32_t expand[256][8];
  LanePermutes() {
    for (int m = 0; m < 256; ++m) {
      int n = 0;
      for (int l = 0; l < 8; ++l) {
        compress[m][l] = 0;
        expand[m][l] = 0;
      }
      for (int l = 0; l < 8; ++l)
        if (m >> l & 1) {
          compress[m][n] = l;
          expand[m][l] = n++;
        }
    }
  }
};

const LanePermutes& lane_permutes() {
  static const LanePermutes table;
  return table;
}

void compress_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
  const LanePermutes& t = lane_permutes();
  for (int64_t c0 = 0; c0 < ncols; c0 += 8) {
    const unsigned m = mask[c0 / 16] >> (c0 % 16) & 0xFFu;
    const __m256 v = c0 + 8 <= ncols ? _mm256_loadu_ps(src + c0)
                                     : _mm256_maskload_ps(src + c0, VecF::lanes(m));
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(t.compress[m]))));
    dst += _mm_popcnt_u32(m);  // whole: the next block overwrites the rest
  }
}

void expand_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
  const LanePermutes& t = lane_permutes();
  for (int64_t c0 = 0; c0 < ncols; c0 += 8) {
    const unsigned m = mask[c0 / 16] >> (c0 % 16) & 0xFFu;
    const __m256 moved = _mm256_permutevar8x32_ps(_mm256_loadu_ps(src),
                                                  _mm256_load_si256(reinterpret_cast<const __m256i*>(t.expand[m])));
    const __m256 v = _mm256_and_ps(moved, _mm256_castsi256_ps(VecF::lanes(m)));
    if (c0 + 8 <= ncols)
      _mm256_storeu_ps(dst + c0, v);
    else
      _mm256_maskstore_ps(dst + c0, VecF::tail(static_cast<int>(ncols - c0)), v);
    src += _mm_popcnt_u32(m);
  }
}

}  // namespace avx2
DK_TARGET_END
#endif  // DK_X86_KERNELS

enum class Isa { portable, avx2, avx512 };

// torch's own choice for its CPU kernels ("AVX512", "AVX2", "DEFAULT", ...): it checks the
// CPU and the OS through cpuinfo and honours ATEN_CPU_CAPABILITY.
Isa pick_isa() {
#if DK_X86_KERNELS
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return Isa::avx512;
  if (cap == "AVX2") return Isa::avx2;
#endif
  return Isa::portable;
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

}  // namespace

template <typename T>
void run_gemm(const GemmProblem<T>& problem) {
  switch (isa()) {
#if DK_X86_KERNELS
    case Isa::avx512:
      return avx512::gemm(problem);
    case Isa::avx2:
      return avx2::gemm(problem);
#endif
    default:
      return portable::gemm(problem);
  }
}

template void run_gemm<float>(const GemmProblem<float>&);
template void run_gemm<double>(const GemmProblem<double>&);

void gather_planes(const float* src, int64_t pixel_stride, int64_t channels, const int32_t* chan, int64_t kin,
                   int64_t pixels, float* planes, int64_t ld) {
  switch (isa()) {
#if DK_X86_KERNELS
    case Isa::avx512:
      return avx512::gather_planes(src, pixel_stride, channels, chan, kin, pixels, planes, ld);
    case Isa::avx2:
      return avx2::gather_planes(src, pixel_stride, channels, chan, kin, pixels, planes, ld);
#endif
    default:
      return portable::gather_planes(src, pixel_stride, channels, chan, kin, pixels, planes, ld);
  }
}

void gather_row_shift(const float* src, int64_t pixel_stride, int64_t channels, const int32_t* chan, int64_t kin,
                      int64_t H, int64_t W, int64_t kw, int64_t ph, int64_t pw, int64_t dw, float* rows, int64_t plane) {
  switch (isa()) {
#if DK_X86_KERNELS
    case Isa::avx512:
      return avx512::gather_row_shift(src, pixel_stride, channels, chan, kin, H, W, kw, ph, pw, dw, rows, plane);
    case Isa::avx2:
      return avx2::gather_row_shift(src, pixel_stride, channels, chan, kin, H, W, kw, ph, pw, dw, rows, plane);
#endif
    default:
      return portable::gather_row_shift(src, pixel_stride, channels, chan, kin, H, W, kw, ph, pw, dw, rows, plane);
  }
}

bool row_shift_planes(const float* src, const int32_t* chan, int64_t sc, int64_t kin, int64_t H, int64_t W, int64_t kw,
                      int64_t ph, int64_t pw, int64_t dw, float* rows, int64_t plane) {
  switch (isa()) {
#if DK_X86_KERNELS
    case Isa::avx512:
      return avx512::row_shift_planes<avx512::VecF>(src, chan, sc, kin, H, W, kw, ph, pw, dw, rows, plane);
#endif
    // (AVX2 has the windows too, but from NCHW planes they were no faster than the caller's
    // own copy on an AMD EPYC (Zen 2, 1 thread, output density 0.5), and 10 - 15% slower on a
    // 16-channel 32x32 layer; from channels_last pixels, in gather_row_shift, they are used
    // there: 1 - 10% less time per conv at 16x16 and 8x8, 3 - 5% more at 16 channels 32x32.)
    default:
      return false;
  }
}

void scatter_planes(const float* rows, const int64_t* off, int64_t channels, int64_t pixels, float* pixels_out,
                    int64_t pixel_stride) {
  switch (isa()) {
#if DK_X86_KERNELS
    case Isa::avx512:
      return avx512::scatter_planes(rows, off, channels, pixels, pixels_out, pixel_stride);
    case Isa::avx2:
      return avx2::scatter_planes(rows, off, channels, pixels, pixels_out, pixel_stride);
#endif
    default:
      return portable::scatter_planes(rows, off, channels, pixels, pixels_out, pixel_stride);
  }
}

void compress_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
#if DK_X86_KERNELS
  if (isa() == Isa::avx512) return avx512::compress_row(src, mask, ncols, dst);
  avx2::compress_row(src, mask, ncols, dst);
#endif
}

void expand_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst) {
#if DK_X86_KERNELS
  if (isa() == Isa::avx512) return avx512::expand_row(src, mask, ncols, dst);
  avx2::expand_row(src, mask, ncols, dst);
#endif
}

const char* gemm_isa() {
  switch (isa()) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace cpu_conv
}  // namespace dynkernels
