// CPU test of the index arithmetic of the CUDA channel_sparse_conv2d kernel
// (csrc/cuda/channel_sparse_conv2d_tiles.h), compiled with g++ and run by
// python_tests/test_channel_sparse_conv2d_tiles.py. Prints one line per failed check (at most
// 30) and "ok: N checks" on success; the exit code is the number of failures (capped at 100).
//
// Besides properties of single functions (bijections, coverage, alignment, bank conflicts),
// emulate() runs the kernel's data flow for whole convolutions on the CPU: every block of the
// grid, every thread's cp.async chunks and gathered elements into the swizzled stages, every
// warp's ldmatrix.x4 and mma.m16n8k16 (or every thread's FMAs), the staging tile and the
// epilogue stores, all through the functions the kernel calls. The semantics of ldmatrix and mma
// (which lane receives which element) are written out here from the PTX ISA, independently of
// the header, so a lane mapping in the header that disagrees with the hardware gives a wrong
// convolution. Values are small integers, so the result is exact.
#include "../../csrc/cuda/channel_sparse_conv2d_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <set>
#include <vector>

using namespace dynkernels::conv_tiles;

static long checks = 0, failures = 0;
#define CHECK(cond, ...)                                                \
  do {                                                                  \
    ++checks;                                                           \
    if (!(cond)) {                                                      \
      if (failures++ < 30) {                                            \
        std::fprintf(stderr, "FAIL line %d: %s: ", __LINE__, #cond);    \
        std::fprintf(stderr, __VA_ARGS__);                              \
        std::fprintf(stderr, "\n");                                     \
      }                                                                 \
    }                                                                   \
  } while (0)

struct Case {  // a configuration with the element size it runs with
  TileConfig c;
  int elem_bytes;
  bool mma;  // tensor cores (16-bit) or FMAs (fp32)
  const char* name;
};

static std::vector<Case> all_cases() {
  static char names[kNumTileConfigs][32];
  std::vector<Case> v;
  for (int i = 0; i < kNumTileConfigs; ++i) {
    std::snprintf(names[i], sizeof(names[i]), "config %d", i);
    v.push_back({kTileConfigs[i], 2, true, names[i]});
  }
  v.push_back({kFmaTileConfig, 4, false, "fp32"});
  return v;
}

// ----------------------------------------------------------------------------- properties
static void check_configs() {
  bool wide = false;
  for (const Case& k : all_cases()) {
    CHECK(is_valid_config(k.c, k.elem_bytes), "%s", k.name);
    CHECK(smem_bytes(k.c, k.elem_bytes) <= 227 * 1024, "%s: %d bytes", k.name, smem_bytes(k.c, k.elem_bytes));
    CHECK(row_table_offset(k.c, k.elem_bytes) % 16 == 0, "%s", k.name);
    CHECK(row_table_offset(k.c, k.elem_bytes) >= pipeline_bytes(k.c, k.elem_bytes) &&
              row_table_offset(k.c, k.elem_bytes) >= staging_bytes(k.c),
          "%s: the row table overlaps the ring or the staging tile", k.name);
    wide = wide || (k.mma && (k.c.bm == 128 || k.c.bn == 128));
  }
  CHECK(wide, "a 128-wide tensor-core tile");
  for (int64_t cout : {1, 16, 64, 65, 512, 2048})
    for (int64_t pixels : {1, 49, 64, 65, 196, 3136}) {
      const int id = default_tile_config(cout, pixels);
      CHECK(id >= 0 && id < kNumTileConfigs, "default_tile_config(%ld, %ld) = %d", (long)cout, (long)pixels, id);
    }
}

static void check_swizzle() {
  for (int cpr : {4, 8})
    for (int rows : {32, 64, 128}) {
      std::vector<int> seen(rows * cpr, 0);
      for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cpr; ++c) {
          const int q = swizzled_chunk(r, c, cpr);
          CHECK(q >= 0 && q < rows * cpr, "cpr %d row %d chunk %d -> %d", cpr, r, c, q);
          if (q >= 0 && q < rows * cpr) ++seen[q];
        }
      for (int q = 0; q < rows * cpr; ++q) CHECK(seen[q] == 1, "cpr %d rows %d: chunk %d hit %d times", cpr, rows, q, seen[q]);
      // An ldmatrix phase: 8 consecutive rows from a multiple of 8, one logical chunk: 8 distinct
      // slots of 16 bytes within 128-byte lines, i.e. every bank once.
      for (int r0 = 0; r0 < rows; r0 += 8)
        for (int c = 0; c < cpr; ++c) {
          std::set<int> slots;
          for (int r = r0; r < r0 + 8; ++r) slots.insert(swizzled_chunk(r, c, cpr) & 7);
          CHECK(slots.size() == 8, "cpr %d rows %d..%d chunk %d: bank conflict", cpr, r0, r0 + 7, c);
        }
    }
}

// b_chunk_offset's split form against the direct offset, over origins around a padded image.
static void check_b_offsets() {
  Params P{};
  P.H = 7; P.W = 9; P.Kc = 24; P.dil_h = 2; P.dil_w = 1;
  for (int oh = -3; oh < 9; ++oh)
    for (int ow = -3; ow < 11; ++ow)
      for (int r = 0; r < 3; ++r)
        for (int s = 0; s < 4; ++s)
          for (int j : {0, 8, 16, 24}) {
            const int ih = oh + r * P.dil_h, iw = ow + s * P.dil_w;
            const bool inside = ih >= 0 && ih < P.H && iw >= 0 && iw < P.W && j < P.Kc;
            const int want = inside ? (ih * P.W + iw) * P.Kc + j : -1;
            CHECK(b_chunk_offset(P, Coord{oh, ow}, r, s, j) == want, "origin (%d, %d) tap (%d, %d) j %d", oh, ow, r, s, j);
          }
}

static void check_k_tiles() {
  for (int chunks : {1, 2, 3, 16})
    for (int kh : {1, 3})
      for (int kw : {1, 2, 3, 7}) {
        KTileIter it = KTileIter::first();
        for (int t = 0; t < kh * kw * chunks; ++t) {
          const KTile kt = k_tile(t, chunks, 32);
          CHECK(it.rs == kt.rs && it.j0 == kt.j0 && it.r == kt.rs / kw && it.s == kt.rs % kw,
                "chunks %d kw %d tile %d: iterator (%d, %d, %d, %d), k_tile (%d, %d)", chunks, kw, t, it.rs, it.r, it.s,
                it.j0, kt.rs, kt.j0);
          it.next(chunks, 32, kw);
        }
      }
}

// cp.async rounds: coverage of a stage, the column and destination identities the kernel uses,
// and conflict-free 128-byte wavefronts (8 consecutive threads, 8 distinct slots).
static void check_copy_maps() {
  for (const Case& k : all_cases()) {
    const StageSplit sp = stage_split(k.c, k.elem_bytes);
    const int T = threads_of(k.c);
    for (int rows : {k.c.bm, k.c.bn}) {
      const int rounds = rows * sp.cpr / T;
      CHECK(rounds == (rows == k.c.bm ? sp.a_chunks : sp.b_chunks), "%s", k.name);
      std::vector<int> seen(rows * sp.cpr, 0);
      for (int tid = 0; tid < T; ++tid) {
        const Coord q0 = load_chunk(tid, 0, T, sp.cpr);
        for (int i = 0; i < rounds; ++i) {
          const Coord q = load_chunk(tid, i, T, sp.cpr);
          CHECK(q.col == q0.col && q.row < rows, "%s tid %d round %d", k.name, tid, i);
          CHECK(swizzled_chunk(q.row, q.col, sp.cpr) == swizzled_chunk(q0.row, q0.col, sp.cpr) + i * T,
                "%s tid %d round %d: destination is not round 0's + i * threads", k.name, tid, i);
          ++seen[q.row * sp.cpr + q.col];
        }
      }
      for (int q = 0; q < rows * sp.cpr; ++q) CHECK(seen[q] == 1, "%s: chunk %d copied %d times", k.name, q, seen[q]);
      for (int i = 0; i < rounds; ++i)
        for (int t0 = 0; t0 < T; t0 += 8) {
          std::set<int> slots;
          for (int tid = t0; tid < t0 + 8; ++tid) {
            const Coord q = load_chunk(tid, i, T, sp.cpr);
            slots.insert(swizzled_chunk(q.row, q.col, sp.cpr) & 7);
          }
          CHECK(slots.size() == 8, "%s: cp.async wavefront of threads %d.. conflicts", k.name, t0);
        }
    }
    // Gathered A pairs: coverage, a fixed column pair per thread, conflict-free stores (each
    // bank once per 128-byte wavefront).
    std::vector<int> seen(k.c.bm * k.c.bk, 0);
    for (int tid = 0; tid < T; ++tid)
      for (int i = 0; i < sp.a_pairs; ++i) {
        const Coord e = gather_pair(tid, i, T, k.c.bk);
        CHECK(e.col == gather_pair(tid, 0, T, k.c.bk).col && e.col % 2 == 0 && e.row < k.c.bm, "%s tid %d", k.name, tid);
        ++seen[e.row * k.c.bk + e.col];
        ++seen[e.row * k.c.bk + e.col + 1];
      }
    for (int e = 0; e < k.c.bm * k.c.bk; ++e) CHECK(seen[e] == 1, "%s: gathered element %d stored %d times", k.name, e, seen[e]);
    const int pair_bytes = 2 * k.elem_bytes, per_wave = 128 / pair_bytes;
    for (int i = 0; i < sp.a_pairs; ++i)
      for (int t0 = 0; t0 < T; t0 += per_wave) {
        std::set<int> banks;
        for (int tid = t0; tid < t0 + per_wave; ++tid) {
          const Coord e = gather_pair(tid, i, T, k.c.bk);
          const int byte = (swizzled_chunk(e.row, e.col / sp.vec, sp.cpr) * sp.vec + e.col % sp.vec) * k.elem_bytes;
          for (int b = 0; b < pair_bytes; b += 4) banks.insert((byte + b) / 4 % 32);
        }
        CHECK((int)banks.size() == 32, "%s: gathered stores of threads %d.. conflict", k.name, t0);
      }
  }
}

// ldmatrix.x4 phases (8 lanes each give one row): distinct slots, for every fragment of every warp.
static void check_ldmatrix_banks() {
  for (const Case& k : all_cases()) {
    if (!k.mma) continue;
    const int cpr = stage_split(k.c, k.elem_bytes).cpr;
    for (int warp = 0; warp < k.c.warps_m * k.c.warps_n; ++warp) {
      const Coord w = warp_origin(warp, k.c.bm, k.c.bn, k.c.warps_m, k.c.warps_n);
      for (int kk = 0; kk < k.c.bk / 16; ++kk)
        for (int operand = 0; operand < 2; ++operand) {
          const int n16 = operand == 0 ? k.c.bm / k.c.warps_m / 16 : k.c.bn / k.c.warps_n / 16;
          for (int f = 0; f < n16; ++f)
            for (int mat = 0; mat < 4; ++mat) {
              std::set<int> slots;
              for (int lane = 8 * mat; lane < 8 * mat + 8; ++lane) {
                const Coord l = operand == 0 ? ldmatrix_a_lane(lane) : ldmatrix_b_lane(lane);
                const int base = operand == 0 ? w.row : w.col;
                const uint32_t direct = 16u * swizzled_chunk(base + 16 * f + l.row, 2 * kk + l.col, cpr);
                const uint32_t origin = 16u * swizzled_chunk(base + l.row, l.col, cpr);
                CHECK(ldmatrix_address(origin, f, kk, cpr) == direct, "%s warp %d lane %d f %d kk %d: stepped address",
                      k.name, warp, lane, f, kk);
                slots.insert(direct / 16 & 7);
              }
              CHECK(slots.size() == 8, "%s warp %d operand %d fragment %d: ldmatrix conflict", k.name, warp, operand, f);
            }
        }
    }
  }
}

// ----------------------------------------------------------------------------- emulation
struct Problem {
  int N, Cin, H, W, Cout, KH, KW, sh, sw, ph, pw, dh, dw;
  bool in_gate, bias, shift;
  double density;
  unsigned seed;
};

struct Data {
  Params P{};
  int Ho, Wo;
  std::vector<float> x, w, b, t, og, ig;  // x [N, Cin, H, W], w [Cout, Cin, KH, KW], gates [N, C]
  std::vector<int> out_list, out_count, in_list, in_count;
  std::vector<float> xb, wt;  // the kernel's operands: [N, H, W, Kc] and [Cout, KH*KW, Kc]
  std::vector<float> wc;      // with an input gate: compacted rows [N, Cout, KH*KW, Kc] (the host's prologue)
};

static void compact(const std::vector<float>& gate, int N, int C, std::vector<int>& list, std::vector<int>& count) {
  list.assign(N * C, 0);
  count.assign(N, 0);
  for (int n = 0; n < N; ++n) {
    int k = 0;
    for (int c = 0; c < C; ++c)
      if (gate[n * C + c] > 0) list[n * C + k++] = c;
    count[n] = k;
    for (int c = 0; c < C; ++c)
      if (!(gate[n * C + c] > 0)) list[n * C + k++] = c;
  }
}

static Data make_data(const Problem& pr) {
  Data d;
  std::mt19937 rng(pr.seed);
  auto small = [&] { return float(int(rng() % 7) - 3); };
  auto gate = [&](int i) {  // sample 0: all on; the last sample (N > 2): all off; else random
    const int n = i;
    if (n == 0) return 1.0f + float(rng() % 3);
    if (pr.N > 2 && n == pr.N - 1) return 0.0f;
    return (rng() % 1000) < pr.density * 1000 ? 1.0f + float(rng() % 3) : 0.0f;
  };
  d.Ho = (pr.H + 2 * pr.ph - pr.dh * (pr.KH - 1) - 1) / pr.sh + 1;
  d.Wo = (pr.W + 2 * pr.pw - pr.dw * (pr.KW - 1) - 1) / pr.sw + 1;
  d.x.resize((size_t)pr.N * pr.Cin * pr.H * pr.W);
  for (float& v : d.x) v = small();
  d.w.resize((size_t)pr.Cout * pr.Cin * pr.KH * pr.KW);
  for (float& v : d.w) v = small();
  d.b.assign(pr.Cout, 0.0f);
  d.t.assign(pr.Cout, 0.0f);
  for (int c = 0; c < pr.Cout; ++c) {
    if (pr.bias) d.b[c] = small();
    if (pr.shift) d.t[c] = small();
  }
  d.og.resize(pr.N * pr.Cout);
  for (int n = 0; n < pr.N; ++n)
    for (int c = 0; c < pr.Cout; ++c) d.og[n * pr.Cout + c] = gate(n);
  compact(d.og, pr.N, pr.Cout, d.out_list, d.out_count);
  if (pr.in_gate) {
    d.ig.resize(pr.N * pr.Cin);
    for (int n = 0; n < pr.N; ++n)
      for (int c = 0; c < pr.Cin; ++c) d.ig[n * pr.Cin + c] = (n == 0 || rng() % 2) ? 1.0f : 0.0f;
    compact(d.ig, pr.N, pr.Cin, d.in_list, d.in_count);
  }
  const int Kc = (pr.Cin + 7) / 8 * 8, taps = pr.KH * pr.KW;
  d.xb.assign((size_t)pr.N * pr.H * pr.W * Kc, 0.0f);  // the host's gather prologue
  for (int n = 0; n < pr.N; ++n)
    for (int h = 0; h < pr.H; ++h)
      for (int ww = 0; ww < pr.W; ++ww) {
        const int ca = pr.in_gate ? d.in_count[n] : pr.Cin;
        for (int j = 0; j < ca; ++j) {
          const int c = pr.in_gate ? d.in_list[n * pr.Cin + j] : j;
          d.xb[(((size_t)n * pr.H + h) * pr.W + ww) * Kc + j] = d.x[(((size_t)n * pr.Cin + c) * pr.H + h) * pr.W + ww];
        }
      }
  d.wt.assign((size_t)pr.Cout * taps * Kc, 0.0f);
  for (int o = 0; o < pr.Cout; ++o)
    for (int c = 0; c < pr.Cin; ++c)
      for (int rs = 0; rs < taps; ++rs) d.wt[((size_t)o * taps + rs) * Kc + c] = d.w[((size_t)o * pr.Cin + c) * taps + rs];
  if (pr.in_gate) {  // compact_weight_rows_kernel; rows past the active count hold NaN (never read)
    d.wc.assign((size_t)pr.N * pr.Cout * taps * Kc, std::nanf(""));
    for (int n = 0; n < pr.N; ++n)
      for (int m = 0; m < d.out_count[n]; ++m)
        for (int rs = 0; rs < taps; ++rs)
          for (int j = 0; j < Kc; ++j)
            d.wc[(((size_t)n * pr.Cout + m) * taps + rs) * Kc + j] =
                j < d.in_count[n] ? d.wt[((size_t)d.out_list[n * pr.Cout + m] * taps + rs) * Kc + d.in_list[n * pr.Cin + j]]
                                  : 0.0f;
  }
  Params& P = d.P;
  P.N = pr.N; P.Cin = pr.Cin; P.H = pr.H; P.W = pr.W; P.Kc = Kc; P.Cout = pr.Cout; P.KH = pr.KH; P.KW = pr.KW;
  P.Ho = d.Ho; P.Wo = d.Wo;
  P.stride_h = pr.sh; P.stride_w = pr.sw; P.pad_h = pr.ph; P.pad_w = pr.pw; P.dil_h = pr.dh; P.dil_w = pr.dw;
  return d;
}

// y[n][c][p] from the definition (double).
static std::vector<double> reference(const Problem& pr, const Data& d) {
  const int HWo = d.Ho * d.Wo;
  std::vector<double> y((size_t)pr.N * pr.Cout * HWo, 0.0);
  for (int n = 0; n < pr.N; ++n)
    for (int o = 0; o < pr.Cout; ++o) {
      const float g = d.og[n * pr.Cout + o];
      if (!(g > 0)) continue;
      for (int p = 0; p < HWo; ++p) {
        const int oh = p / d.Wo, ow = p % d.Wo;
        double acc = 0.0;
        for (int c = 0; c < pr.Cin; ++c) {
          if (pr.in_gate && !(d.ig[n * pr.Cin + c] > 0)) continue;
          for (int r = 0; r < pr.KH; ++r)
            for (int s = 0; s < pr.KW; ++s) {
              const int ih = oh * pr.sh - pr.ph + r * pr.dh, iw = ow * pr.sw - pr.pw + s * pr.dw;
              if (ih < 0 || ih >= pr.H || iw < 0 || iw >= pr.W) continue;
              acc += (double)d.x[(((size_t)n * pr.Cin + c) * pr.H + ih) * pr.W + iw] *
                     d.w[(((size_t)o * pr.Cin + c) * pr.KH + r) * pr.KW + s];
            }
        }
        y[((size_t)n * pr.Cout + o) * HWo + p] = (acc + d.b[o]) * g + d.t[o];
      }
    }
  return y;
}

// PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs (g = lane / 4, t = lane % 4; register r holds
// elements 2r and 2r + 1 of the lane's fragment, h = 0, 1 selects one):
//   A (16 x 16, row): register r, half h -> row g + 8 (r % 2), column 2t + h + 8 (r / 2)
//   B (16 x 8, col):  register r, half h -> row (k) 2t + h + 8r, column (n) g
//   C (16 x 8):       element e         -> row g + 8 (e / 2), column 2t + e % 2
// ldmatrix.m8n8.x4.b16: lanes 8i .. 8i + 7 address rows 0..7 of matrix i; lane l receives
// row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of matrix i in register i.
struct Frag {
  float v[32][4][2];  // [lane][register][half]
};
template <typename Addr>  // Addr(lane) -> element index of the row that lane addresses
static Frag ldmatrix_x4(const std::vector<float>& smem, Addr addr) {
  Frag f;
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) f.v[lane][i][h] = smem[addr(8 * i + lane / 4) + 2 * (lane % 4) + h];
  return f;
}
// acc[lane][e] += A * B for the A fragment `a` and the B fragment in registers b_reg, b_reg + 1 of `b`.
static void mma(float (&acc)[32][4], const Frag& a, const Frag& b, int b_reg) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < 2; ++h) A[g + 8 * (r % 2)][2 * t + h + 8 * (r / 2)] = a.v[lane][r][h];
    for (int r = 0; r < 2; ++r)
      for (int h = 0; h < 2; ++h) B[2 * t + h + 8 * r][g] = b.v[lane][b_reg + r][h];
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      const int row = lane / 4 + 8 * (e / 2), col = 2 * (lane % 4) + e % 2;
      float s = 0.0f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      acc[lane][e] += s;
    }
}

// Runs the kernel's data flow for configuration k on problem pr; returns y [N][Cout][Ho*Wo].
// compact: with an input gate, read the per-sample compacted weight rows instead of gathering.
static std::vector<double> emulate(const Case& k, const Problem& pr, const Data& d, bool pixel_major, bool compact) {
  Params P = d.P;
  if (compact) P.w_sample_stride = (int64_t)P.Cout * P.KH * P.KW * P.Kc;
  const std::vector<float>& weights = compact ? d.wc : d.wt;
  const TileConfig& c = k.c;
  const StageSplit sp = stage_split(c, k.elem_bytes);
  const int T = threads_of(c), HWo = d.Ho * d.Wo;
  const bool gather_k = pr.in_gate && !compact;
  std::vector<double> y((size_t)P.N * P.Cout * HWo, std::nan(""));
  std::vector<int> writes(y.size(), 0);
  std::vector<float> sA(c.bm * c.bk), sB(c.bn * c.bk), staging(staging_bytes(c) / 4);
  std::vector<int> sA_n(sA.size()), sB_n(sB.size()), staging_n(staging.size());
  std::vector<RowInfo> rows_info(c.bm);
  for (int n = 0; n < P.N; ++n)
    for (int by = 0; by < (P.Cout + c.bm - 1) / c.bm; ++by)
      for (int bx = 0; bx < (HWo + c.bn - 1) / c.bn; ++bx) {
        const int m0 = by * c.bm, p0 = bx * c.bn, count = d.out_count[n];
        for (int m = 0; m < c.bm; ++m) {
          RowInfo r{-1, -1, 0.0f, 0.0f, 0.0f};
          if (m0 + m < P.Cout) {
            r.channel = d.out_list[n * P.Cout + m0 + m];
            if (m0 + m < count) {
              r.w_off = weight_row_offset(P, m0 + m, r.channel);
              r.gate = d.og[n * P.Cout + r.channel];
              r.bias = d.b[r.channel];
              r.shift = d.t[r.channel];
            }
          }
          rows_info[m] = r;
        }
        std::fill(staging_n.begin(), staging_n.end(), 0);
        if (m0 < count) {
          const int ca = pr.in_gate ? d.in_count[n] : P.Cin;
          const int chunks = (ca + c.bk - 1) / c.bk, tiles = P.KH * P.KW * chunks;
          const long w_base = (long)n * P.w_sample_stride;
          const int rows = count - m0, cols = HWo - p0;
          std::vector<float> acc_mma;  // [warp][mi][ni][lane][e]
          const int WTM = c.bm / c.warps_m, WTN = c.bn / c.warps_n, MT = WTM / 16, NT = WTN / 8;
          if (k.mma) acc_mma.assign((size_t)c.warps_m * c.warps_n * MT * NT * 32 * 4, 0.0f);
          std::vector<float> acc_fma(T * 32, 0.0f);  // [tid][i * 4 + q]
          KTileIter kt = KTileIter::first();
          for (int t = 0; t < tiles; ++t, kt.next(chunks, c.bk, P.KW)) {
            std::fill(sA_n.begin(), sA_n.end(), 0);
            std::fill(sB_n.begin(), sB_n.end(), 0);
            for (int tid = 0; tid < T; ++tid) {
              const Coord q0 = load_chunk(tid, 0, T, sp.cpr);
              const int j = kt.j0 + q0.col * sp.vec;
              auto copy = [&](std::vector<float>& dst, std::vector<int>& dst_n, int chunk, const std::vector<float>& src,
                              long off, long base, long size) {
                CHECK(off < 0 || (off % sp.vec == 0 && base + off + sp.vec <= size && off >= 0),
                      "%s: cp.async source %ld unaligned or out of range", k.name, off);
                for (int e = 0; e < sp.vec; ++e) {
                  dst[chunk * sp.vec + e] = off < 0 ? 0.0f : src[base + off + e];
                  ++dst_n[chunk * sp.vec + e];
                }
              };
              // The kernel's split offsets (per-thread part + per-stage part), next to the direct ones.
              const int col = q0.col * sp.vec;
              if (!gather_k)
                for (int i = 0; i < sp.a_chunks; ++i) {
                  const Coord q = load_chunk(tid, i, T, sp.cpr);
                  const int w_off = rows_info[q.row].w_off;
                  const int a_off = w_off < 0 ? -1 : w_off + col;
                  const bool valid = kt.j0 + col < P.Kc && a_off >= 0;
                  const int off = valid ? a_off + kt.rs * P.Kc + kt.j0 : -1;
                  CHECK(off == a_chunk_offset(P, w_off, kt.rs, j), "%s: A offset", k.name);
                  copy(sA, sA_n, swizzled_chunk(q.row, q.col, sp.cpr), weights, off, w_base, (long)weights.size());
                }
              for (int i = 0; i < sp.b_chunks; ++i) {
                const Coord q = load_chunk(tid, i, T, sp.cpr);
                const int p = p0 + q.row;
                const Coord o = window_origin(P, p < HWo ? p : 0);
                const bool valid = kt.j0 + col < P.Kc && p < HWo && b_tap_inside(P, o, kt.r, kt.s);
                const int off = valid ? b_pixel_offset(P, o) + col + b_tap_offset(P, kt.r, kt.s) + kt.j0 : -1;
                CHECK(off == (p < HWo ? b_chunk_offset(P, o, kt.r, kt.s, j) : -1), "%s: B offset", k.name);
                copy(sB, sB_n, swizzled_chunk(q.row, q.col, sp.cpr), d.xb, off, (long)n * P.H * P.W * P.Kc,
                     (long)d.xb.size());
              }
              if (gather_k) {
                const int pair_col = gather_pair(tid, 0, T, c.bk).col;
                const int left = ca - pair_col - kt.j0;
                const int* in_cols = &d.in_list[n * P.Cin] + pair_col;
                const int c0 = left > 0 ? in_cols[kt.j0] : -1, c1 = left > 1 ? in_cols[kt.j0 + 1] : -1;
                for (int i = 0; i < sp.a_pairs; ++i) {
                  const Coord e = gather_pair(tid, i, T, c.bk);
                  const int w_off = rows_info[e.row].w_off;
                  const int o[2] = {a_element_offset(P, w_off, kt.rs, c0), a_element_offset(P, w_off, kt.rs, c1)};
                  const int at = swizzled_chunk(e.row, e.col / sp.vec, sp.cpr) * sp.vec + e.col % sp.vec;
                  CHECK(at % 2 == 0, "%s: gathered pair store unaligned", k.name);
                  for (int h = 0; h < 2; ++h) {
                    CHECK(o[h] < (long)d.wt.size(), "%s: gathered source out of range", k.name);
                    sA[at + h] = o[h] < 0 ? 0.0f : d.wt[o[h]];
                    ++sA_n[at + h];
                  }
                }
              }
            }
            for (size_t e = 0; e < sA.size(); ++e) CHECK(sA_n[e] == 1, "%s: A stage element %zu written %d times", k.name, e, sA_n[e]);
            for (size_t e = 0; e < sB.size(); ++e) CHECK(sB_n[e] == 1, "%s: B stage element %zu written %d times", k.name, e, sB_n[e]);
            const int ks = ca - kt.j0;
            if (k.mma) {
              for (int warp = 0; warp < c.warps_m * c.warps_n; ++warp) {
                const Coord w = warp_origin(warp, c.bm, c.bn, c.warps_m, c.warps_n);
                if (w.row >= rows || w.col >= cols) continue;
                for (int kk = 0; kk < c.bk / 16 && kk * 16 < ks; ++kk) {
                  // The kernel's addresses: the lane's origin, stepped by ldmatrix_address (bytes; 16-bit elements).
                  std::vector<Frag> bf(NT / 2);
                  for (int nj = 0; nj < NT / 2; ++nj)
                    bf[nj] = ldmatrix_x4(sB, [&](int lane) {
                      const Coord l = ldmatrix_b_lane(lane);
                      return (int)ldmatrix_address(16u * swizzled_chunk(w.col + l.row, l.col, sp.cpr), nj, kk, sp.cpr) / 2;
                    });
                  for (int mi = 0; mi < MT; ++mi) {
                    if (w.row + mi * 16 >= rows) continue;
                    const Frag af = ldmatrix_x4(sA, [&](int lane) {
                      const Coord l = ldmatrix_a_lane(lane);
                      return (int)ldmatrix_address(16u * swizzled_chunk(w.row + l.row, l.col, sp.cpr), mi, kk, sp.cpr) / 2;
                    });
                    for (int ni = 0; ni < NT; ++ni) {
                      float(&acc)[32][4] = *reinterpret_cast<float(*)[32][4]>(
                          &acc_mma[(((size_t)warp * MT + mi) * NT + ni) * 128]);
                      mma(acc, af, bf[ni / 2], 2 * (ni % 2));
                    }
                  }
                }
              }
            } else {
              for (int tid = 0; tid < T; ++tid) {
                const int ty = tid / 16, tx = tid % 16;
                for (int kc = 0; kc < sp.cpr && kc * 4 < ks; ++kc)
                  for (int i = 0; i < 8; ++i)
                    for (int q = 0; q < 4; ++q)
                      for (int e = 0; e < 4; ++e)
                        acc_fma[tid * 32 + i * 4 + q] += sA[4 * swizzled_chunk(ty + 8 * i, kc, sp.cpr) + e] *
                                                         sB[4 * swizzled_chunk(tx + 16 * q, kc, sp.cpr) + e];
              }
            }
          }
          // Accumulators -> staging tile.
          auto put = [&](int m, int p, float v) {
            CHECK(m >= 0 && m < c.bm && p >= 0 && p < c.bn, "%s: staging (%d, %d) outside the tile", k.name, m, p);
            const int at = staging_offset(m, p, pixel_major, c.bm, c.bn);
            CHECK(at >= 0 && at < (int)staging.size(), "%s: staging offset %d out of range", k.name, at);
            if (at < 0 || at >= (int)staging.size()) return;
            staging[at] = v;
            ++staging_n[at];
          };
          if (k.mma) {
            for (int warp = 0; warp < c.warps_m * c.warps_n; ++warp) {
              const Coord w = warp_origin(warp, c.bm, c.bn, c.warps_m, c.warps_n);
              for (int mi = 0; mi < MT; ++mi)
                for (int ni = 0; ni < NT; ++ni)
                  for (int lane = 0; lane < 32; ++lane)
                    for (int e = 0; e < 4; ++e)
                      put(w.row + mi * 16 + acc_row(lane, e), w.col + ni * 8 + acc_col(lane, e),
                          acc_mma[(((size_t)warp * MT + mi) * NT + ni) * 128 + lane * 4 + e]);
            }
          } else {
            for (int tid = 0; tid < T; ++tid)
              for (int i = 0; i < 8; ++i)
                for (int q = 0; q < 4; ++q) put(tid / 16 + 8 * i, tid % 16 + 16 * q, acc_fma[tid * 32 + i * 4 + q]);
          }
          for (int m = 0; m < c.bm; ++m)
            for (int p = 0; p < c.bn; ++p)
              CHECK(staging_n[staging_offset(m, p, pixel_major, c.bm, c.bn)] == 1, "%s: staging (%d, %d) written %d times",
                    k.name, m, p, staging_n[staging_offset(m, p, pixel_major, c.bm, c.bn)]);
        }
        // Epilogue.
        for (int tid = 0; tid < T; ++tid)
          for (int e = tid; e < c.bm * c.bn; e += T) {
            const Coord q = epilogue_element(e, pixel_major, c.bm, c.bn);
            const RowInfo& r = rows_info[q.row];
            const int p = p0 + q.col;
            if (r.channel < 0 || p >= HWo) continue;
            float v = 0.0f;
            if (r.w_off >= 0) v = (staging[staging_offset(q.row, q.col, pixel_major, c.bm, c.bn)] + r.bias) * r.gate + r.shift;
            const size_t at = ((size_t)n * P.Cout + r.channel) * HWo + p;
            y[at] = v;
            ++writes[at];
          }
      }
  for (size_t e = 0; e < writes.size(); ++e) CHECK(writes[e] == 1, "%s: output element %zu written %d times", k.name, e, writes[e]);
  return y;
}

static void check_emulation() {
  // Partial M, N and K tiles; Cin not a multiple of 8 (Kc padding) or of BK; Cout past 128;
  // 1x1 / 3x3 / 5x5 / non-square kernels, stride 2, dilation 2, padding past the kernel; 7x7
  // outputs (49 of 64 pixels); samples with every / no channel active.
  const Problem problems[] = {
      {3, 19, 9, 11, 37, 3, 3, 1, 1, 1, 1, 1, 1, false, true, true, 0.5, 1},
      {3, 19, 9, 11, 37, 3, 3, 1, 1, 1, 1, 1, 1, true, true, false, 0.5, 2},
      {2, 72, 7, 7, 130, 3, 3, 1, 1, 1, 1, 1, 1, false, false, true, 0.6, 3},
      {3, 72, 7, 7, 130, 3, 3, 1, 1, 1, 1, 1, 1, true, true, true, 0.6, 4},
      {2, 3, 17, 13, 20, 3, 3, 2, 2, 1, 1, 1, 1, false, true, false, 0.5, 5},
      {2, 40, 12, 12, 70, 1, 1, 1, 1, 0, 0, 1, 1, true, true, true, 0.7, 6},
      {2, 24, 10, 12, 16, 3, 5, 1, 2, 2, 1, 2, 1, true, false, false, 0.5, 7},
      {2, 64, 6, 6, 64, 5, 5, 1, 1, 3, 3, 1, 1, false, true, true, 1.0, 8},
      {3, 33, 8, 8, 65, 3, 3, 1, 1, 1, 1, 2, 2, true, true, true, 0.3, 9},
  };
  for (const Problem& pr : problems) {
    const Data d = make_data(pr);
    const std::vector<double> want = reference(pr, d);
    for (const Case& k : all_cases())
      for (bool pixel_major : {false, true}) {
        const long before = failures;
        for (bool compact : {false, true}) {
          if (compact && !pr.in_gate) continue;
          const std::vector<double> got = emulate(k, pr, d, pixel_major, compact);
          double err = 0.0, scale = 0.0;
          for (size_t e = 0; e < want.size(); ++e) {
            // NaN (an unwritten output, or a compacted row never meant to be read) fails
            err = std::isnan(got[e]) ? INFINITY : std::max(err, std::fabs(got[e] - want[e]));
            scale = std::max(scale, std::fabs(want[e]));
          }
          CHECK(err <= 1e-6 * std::max(scale, 1.0), "%s, problem seed %u, %s%s: max error %g (scale %g)", k.name,
                pr.seed, pixel_major ? "channels_last" : "nchw", compact ? ", compacted weights" : "", err, scale);
          if (failures > before) return;  // one broken mapping is enough output
        }
      }
  }
}

int main() {
  check_configs();
  check_swizzle();
  check_k_tiles();
  check_b_offsets();
  check_copy_maps();
  check_ldmatrix_banks();
  check_emulation();
  if (failures) {
    std::fprintf(stderr, "%ld of %ld checks failed\n", failures, checks);
    return failures > 100 ? 100 : (int)failures;
  }
  std::printf("ok: %ld checks\n", checks);
  return 0;
}
