// Tile configurations and index arithmetic of the CUDA channel_sparse_conv2d GEMM kernel
// (channel_sparse_conv2d_gemm.cuh). Plain C++: every function here is __host__ __device__, so
// the kernel and a CPU test (python_tests/cpp/conv_tiles_test.cpp) run the very same mapping of
// threads, lanes and tiles to addresses. Also included by csrc/python_module.cpp, which lists
// the configurations as dynkernels._C.cuda_conv_configs().
//
// The GEMM of one sample n (one thread block computes a BM x BN tile of it):
//   C[m, p] = sum_k A[m, k] * B[p, k]    m: index into the sample's compacted active output channels
//                                        p: output pixel oh * Wo + ow
//   k = (rs, j): rs = r * KW + s over the kernel window, j over the (active) input channels
//   A[m, (rs, j)] = wt[out_list[m], rs, j]             wt: weight as [Cout, KH*KW, Kc]
//   B[p, (rs, j)] = xb[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, j]   xb: NHWC, zero outside
// Both operands are k-contiguous rows: A rows are weight rows, B rows are input pixels, and a
// K tile (rs, j0) is BK consecutive channels j0 .. j0 + BK of one kernel tap, so every load is a
// 16-byte vector (Kc, the channel stride of xb and wt, is a multiple of 8 elements).
// With an input gate, j runs over the sample's compacted active input channels: xb holds them
// compacted, and A[m, (rs, j)] = wt[out_list[m], rs, in_list[j]] is either gathered element by
// element by the GEMM kernel, or (where a sample has many pixel tiles, see
// compact_weights_per_sample) compacted once per sample by a prologue into k-contiguous rows
// wt_n[m, rs, j], which the GEMM then reads like an ungated weight.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline
#endif

namespace dynkernels {
namespace conv_tiles {

// ------------------------------------------------------------------------- configurations
// One tile configuration of the tensor-core (fp16 / bf16) kernel: a thread block computes
// bm output channels x bn output pixels of one sample with warps_m x warps_n warps, each
// owning a (bm / warps_m) x (bn / warps_n) warp tile of mma.m16n8k16 fragments, and streams
// K through a `stages`-deep cp.async ring of bk-element stages.
struct TileConfig {
  int bm;       // output channels per tile (GEMM M)
  int bn;       // output pixels per tile (GEMM N)
  int bk;       // reduction elements per stage: bk input channels of one kernel tap
  int warps_m;  // warps along M
  int warps_n;  // warps along N
  int stages;   // depth of the cp.async pipeline
};

// The `config` argument of the op indexes this table (-1: default_tile_config below).
inline constexpr TileConfig kTileConfigs[] = {
    {128, 128, 32, 2, 4, 4},  // 0: large layers; warp tile 64 x 32
    {128, 64, 32, 2, 2, 4},   // 1: many channels, few pixels (7x7, 14x14); warp tile 64 x 32
    {64, 128, 32, 2, 2, 4},   // 2: few channels, many pixels; warp tile 32 x 64
    {64, 64, 32, 2, 2, 4},    // 3: small layers / low active counts; warp tile 32 x 32
    {128, 128, 64, 2, 4, 3},  // 4: like 0 with half as many barriers per K element
};
inline constexpr int kNumTileConfigs = sizeof(kTileConfigs) / sizeof(kTileConfigs[0]);

// fp32 input runs on the CUDA cores with exact fp32 FMAs (TF32 tensor cores would lose the
// 1e-5 relative accuracy fp32 callers expect) in this one configuration, whatever `config` says.
inline constexpr TileConfig kFmaTileConfig = {64, 64, 32, 2, 2, 3};

// Per output-channel row of a tile, filled once per block before the main loop.
struct RowInfo {
  int w_off;    // element offset of the row's weight row in wt; -1 when the row is inactive
  int channel;  // output channel out_list[m0 + m]; -1 past Cout
  float gate, bias, shift;
};

DK_HD constexpr int threads_of(const TileConfig& c) { return 32 * c.warps_m * c.warps_n; }

// How one stage's copies are split over the threads, for a configuration and an element size.
struct StageSplit {
  int vec;       // elements per 16-byte chunk
  int cpr;       // chunks per stage row (BK / vec)
  int a_chunks;  // cp.async per thread and stage: A (bm rows), B (bn rows)
  int b_chunks;
  int a_pairs;   // element pairs per thread and stage of the gathered A (input gate)
};
DK_HD constexpr StageSplit stage_split(const TileConfig& c, int elem_bytes) {
  const int vec = 16 / elem_bytes, cpr = c.bk / vec, t = threads_of(c);
  return {vec, cpr, c.bm * cpr / t, c.bn * cpr / t, c.bm * c.bk / (2 * t)};
}
// What the kernel relies on (static_assert there, checked for every configuration by the CPU
// test): whole copy rounds; a thread keeps its chunk column and its gathered column pair over
// the rounds; rows of 64 or 128 bytes (swizzled_chunk's conflict-free cases); a ring of at
// least 3 stages; warp tiles of whole m16 x n16 x k16 steps; the row table filled in few rounds.
DK_HD constexpr bool is_valid_config(const TileConfig& c, int elem_bytes) {
  const int t = threads_of(c), vec = 16 / elem_bytes, cpr = c.bk / vec;
  return c.bk % vec == 0 && (cpr == 4 || cpr == 8) && t % 64 == 0 && (c.bm * cpr) % t == 0 &&
         (c.bn * cpr) % t == 0 && (c.bm * c.bk) % (2 * t) == 0 && t % (c.bk / 2) == 0 && c.stages >= 3 &&
         c.bm % (16 * c.warps_m) == 0 && c.bn % (16 * c.warps_n) == 0 && c.bk % 16 == 0 && c.bm <= 4 * t;
}
// Shared memory of one block: the pipeline ring (A and B stages), reused after the main loop
// as the fp32 staging tile of the epilogue, then the row table.
DK_HD constexpr int staging_ld(bool pixel_major, int bm, int bn) { return pixel_major ? bm + 4 : bn + 8; }
DK_HD constexpr int pipeline_bytes(const TileConfig& c, int elem_bytes) {
  return c.stages * (c.bm + c.bn) * c.bk * elem_bytes;
}
DK_HD constexpr int staging_bytes(const TileConfig& c) {
  const int a = c.bn * staging_ld(true, c.bm, c.bn), b = c.bm * staging_ld(false, c.bm, c.bn);
  return 4 * (a > b ? a : b);
}
DK_HD constexpr int row_table_offset(const TileConfig& c, int elem_bytes) {
  const int a = pipeline_bytes(c, elem_bytes), b = staging_bytes(c);
  return ((a > b ? a : b) + 15) / 16 * 16;
}
DK_HD constexpr int smem_bytes(const TileConfig& c, int elem_bytes) {
  return row_table_offset(c, elem_bytes) + c.bm * static_cast<int>(sizeof(RowInfo));
}

// With an input gate: compact each sample's weight rows (active outputs x active inputs) once
// before the GEMM, rather than gathering them element by element in every pixel tile. Worth its
// extra pass over those rows (written once, read by every pixel tile of the sample) where a
// sample has at least 4 pixel tiles; with 1 or 2 (7x7, 14x14) the GEMM reads them about as often.
// The compacted rows take N x Cout x KH*KW x Kc elements (sized for all channels active): not
// past 2^27 elements (256 MiB in 16 bits), where the GEMM gathers instead.
inline bool compact_weights_per_sample(int64_t pixels, int bn, int64_t compacted_elements) {
  return (pixels + bn - 1) / bn >= 4 && compacted_elements <= (int64_t(1) << 27);
}

// config = -1. Only the shape is known on the host (the active counts live on the device), so
// the active count is bounded by Cout: the tile along M is at most Cout rounded up to 64, and
// along N 64 pixels where a sample has few (7x7: 49 of 64 columns used instead of 49 of 128).
inline int default_tile_config(int64_t cout, int64_t pixels) {
  const bool few_channels = cout <= 64, few_pixels = pixels <= 64;
  if (few_channels) return few_pixels ? 3 : 2;
  return few_pixels ? 1 : 0;
}

// ------------------------------------------------------------------------- kernel arguments
// Element offsets within one sample's (padded) input ((H + 2 ph) * (W + 2 pw) * Kc) and within the
// weight (Cout * KH * KW * Kc) are int32: the host checks both sizes.
struct Params {
  const void* xb;         // [N, H, W, Kc] NHWC input (16-byte aligned; channel j < Kc)
  const void* wt;         // [Cout, KH*KW, Kc] weight (entries Cin <= j < Kc are zero), or per
                          // sample compacted rows (w_sample_stride > 0)
  int64_t w_sample_stride;  // 0: wt is shared, row = output channel; else sample n's rows start at
                            // wt + n * w_sample_stride, row m = the m-th active output channel
  const void* bias;       // [Cout] or nullptr
  const void* shift;      // [Cout] or nullptr: added after the gate scale
  const float* out_gate;  // [N, Cout] float32
  const int* out_list;    // [N, Cout] per sample: active output channels ascending, then inactive ones
  const int* out_count;   // [N] number of active output channels
  const int* in_list;     // [N, Cin] like out_list for the input channels; nullptr: no input gate
  const int* in_count;    // [N] or nullptr
  void* y;                // [N, Cout, Ho, Wo], NCHW or channels_last (see pixel_major)
  int N, Cin, H, W, Kc, Cout, KH, KW, Ho, Wo;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t y_sn, y_sc, y_sp;  // y strides of sample, channel and pixel (p = oh * Wo + ow)
  bool pixel_major;          // y is channels_last: the epilogue walks channels fastest
};

// ------------------------------------------------------------------------- K tiles
// K tile t of a sample whose reduction has `chunks` BK-channel chunks per kernel tap.
struct KTile {
  int rs;  // kernel tap r * KW + s
  int j0;  // first channel of the tile
};
DK_HD KTile k_tile(int t, int chunks, int bk) {
  const int rs = t / chunks;
  return {rs, (t - rs * chunks) * bk};
}
// The same sequence without divisions, as the main loop walks it: start at tile 0, next() moves
// to tile t + 1 (j0 steps by bk up to chunks * bk, then the tap (r, s) steps along the row).
struct KTileIter {
  int rs, r, s, j0;
  DK_HD static KTileIter first() { return {0, 0, 0, 0}; }
  DK_HD void next(int chunks, int bk, int kw) {
    j0 += bk;
    if (j0 < chunks * bk) return;
    j0 = 0;
    ++rs;
    if (++s == kw) {
      s = 0;
      ++r;
    }
  }
};

// ------------------------------------------------------------------------- shared memory
// An operand stage is `rows` rows of BK elements, i.e. rows * cpr 16-byte chunks (cpr = chunks
// per row, 4 or 8). Chunk (row, c) sits at chunk index q = row * cpr + c with its slot within
// its 128-byte line (8 chunks) XORed by the line index: the 8 rows an ldmatrix phase reads at
// one logical chunk land in 8 distinct slots, i.e. all 32 banks once (no conflicts), and so do
// the 8 consecutive chunks a quarter warp writes. A bijection on [0, rows * cpr).
DK_HD int swizzled_chunk(int row, int c, int cpr) {
  const int q = row * cpr + c;
  return (q & ~7) | ((q ^ (q >> 3)) & 7);
}

// Which chunk of a `rows` x cpr stage thread `tid` copies in its i-th cp.async (i < rows * cpr /
// threads): consecutive threads take consecutive chunks, so a warp reads whole 16-byte runs of
// consecutive channels of a few rows. With threads % 64 == 0 the column is the same for every
// i and the swizzled destination of round i is that of round 0 plus i * threads chunks (the
// kernel keeps one destination per operand; the CPU test checks the identity).
struct Coord {
  int row, col;
};
DK_HD Coord load_chunk(int tid, int i, int threads, int cpr) {
  const int q = tid + i * threads;
  return {q / cpr, q % cpr};
}
// Which element pair (row, columns col and col + 1) of a BM x BK stage thread `tid` gathers in
// its i-th round (the input-gated A operand, i < BM * BK / (2 * threads)): the 16 lanes of a
// half warp take the 32 consecutive columns of one row (ascending channels of one weight row, a
// few cache lines), and a pair is one 32-bit shared-memory store. With threads % (bk / 2) == 0
// a thread keeps its columns, so it reads their input channel indices once per stage.
DK_HD Coord gather_pair(int tid, int i, int threads, int bk) {
  const int e = tid + i * threads;
  return {e / (bk / 2), 2 * (e % (bk / 2))};
}

// ldmatrix.x4 lane addresses (lanes 8i .. 8i + 7 give the 8 rows of matrix i; lane l receives
// row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of every matrix i in register i). Returned:
// the row (relative to the fragment's first row) and the 16-byte chunk (relative to its first
// k) the lane points at.
// A, one m16 x k16 fragment: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15) = registers a0, a1, a2, a3 of mma.m16n8k16.row.
DK_HD Coord ldmatrix_a_lane(int lane) { return {(lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4}; }
// B, two n8 x k16 fragments (B rows are output pixels, k contiguous = mma's "col" layout):
// matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of the
// first n8 fragment, then b0, b1 of the second.
DK_HD Coord ldmatrix_b_lane(int lane) { return {(lane & 7) + (lane >> 4) * 8, (lane >> 3) & 1}; }

// A lane's ldmatrix address (bytes within a stage) for 16-row fragment f at k16 step kk, from its
// address at (0, 0), 16 * swizzled_chunk(row0 + l.row, l.col) with row0 % 16 == 0: 16 more rows
// are whole groups of 8 lines (an add of 16 * cpr chunks) and chunk l.col + 2 kk = l.col ^ 2 kk
// flips chunk bits only (an XOR), and the swizzle commutes with both (the CPU test checks it),
// so the kernel computes the swizzle once per lane and then one XOR per k step.
DK_HD uint32_t ldmatrix_address(uint32_t at_origin, int f, int kk, int cpr) {
  return (at_origin ^ (uint32_t(kk) << 5)) + uint32_t(f) * 256u * uint32_t(cpr);
}

// mma.m16n8k16 accumulator element e (< 4) of a lane: row lane / 4 (+ 8 for e >= 2), column
// 2 (lane % 4) + e % 2 of the 16 x 8 fragment.
DK_HD int acc_row(int lane, int e) { return (lane >> 2) + ((e >> 1) << 3); }
DK_HD int acc_col(int lane, int e) { return ((lane & 3) << 1) + (e & 1); }

// Warp w's tile, of (bm / warps_m) rows x (bn / warps_n) pixels: its first row and pixel.
DK_HD Coord warp_origin(int warp, int bm, int bn, int warps_m, int warps_n) {
  return {(warp / warps_n) * (bm / warps_m), (warp % warps_n) * (bn / warps_n)};
}

// fp32 staging tile of the epilogue (in floats): [m][p] for NCHW output, [p][m] for
// channels_last output, so that the copy-out reads consecutive addresses along the output's
// contiguous dimension. The padding keeps the fragment stores (nearly) free of bank conflicts.
DK_HD int staging_offset(int m, int p, bool pixel_major, int bm, int bn) {
  return pixel_major ? p * staging_ld(true, bm, bn) + m : m * staging_ld(false, bm, bn) + p;
}
// Element e of the copy-out (e < bm * bn; consecutive threads take consecutive e): channels
// fastest for channels_last output, pixels fastest for NCHW output.
DK_HD Coord epilogue_element(int e, bool pixel_major, int bm, int bn) {
  return pixel_major ? Coord{e % bm, e / bm} : Coord{e / bn, e % bn};
}

// ------------------------------------------------------------------------- global addresses
// Element offset of tile row m0 + m's weight row (output channel `channel`) from the sample's
// weight base (wt + n * w_sample_stride).
DK_HD int weight_row_offset(const Params& P, int m, int channel) {
  return (P.w_sample_stride ? m : channel) * (P.KH * P.KW * P.Kc);
}
// Top-left input coordinate of output pixel p's window.
DK_HD Coord window_origin(const Params& P, int p) {
  const int oh = p / P.Wo, ow = p - (p / P.Wo) * P.Wo;
  return {oh * P.stride_h - P.pad_h, ow * P.stride_w - P.pad_w};
}
// Element offset within sample n's input (xb + n * H * W * Kc) of the 16-byte B chunk at channel
// j, at tap (r, s) of the window whose origin is `o`; -1 where the chunk is zero-filled instead
// (outside the image, or j past the channels). Chunks are 16-byte aligned: Kc and j are
// multiples of 8 elements. The offset splits into a per-thread part (its pixel, fixed over the
// K loop), a per-stage part (the tap, the same for the whole block) and j, which is how the
// kernel computes it; the CPU test checks the split against the direct (ih * W + iw) * Kc + j.
// All parts are int32: the host checks (H + 2 ph) * (W + 2 pw) * Kc < 2^31.
DK_HD int b_pixel_offset(const Params& P, Coord o) { return (o.row * P.W + o.col) * P.Kc; }
DK_HD int b_tap_offset(const Params& P, int r, int s) { return (r * P.dil_h * P.W + s * P.dil_w) * P.Kc; }
DK_HD bool b_tap_inside(const Params& P, Coord o, int r, int s) {
  return unsigned(o.row + r * P.dil_h) < unsigned(P.H) && unsigned(o.col + s * P.dil_w) < unsigned(P.W);
}
DK_HD int b_chunk_offset(const Params& P, Coord o, int r, int s, int j) {
  if (!b_tap_inside(P, o, r, s) || j >= P.Kc) return -1;
  return b_pixel_offset(P, o) + b_tap_offset(P, r, s) + j;
}
// Element offset in wt of the A chunk at channel j of tap rs of the weight row at w_off; -1 where
// zero-filled (inactive row, or j past the channels).
DK_HD int a_chunk_offset(const Params& P, int w_off, int rs, int j) {
  if (w_off < 0 || j >= P.Kc) return -1;
  return w_off + rs * P.Kc + j;
}
// Input-gated A: element offset in wt of weight row w_off at tap rs and input channel c
// (in_list[j], or -1 past the sample's active count); -1 where zero.
DK_HD int a_element_offset(const Params& P, int w_off, int rs, int c) {
  if (w_off < 0 || c < 0) return -1;
  return w_off + rs * P.Kc + c;
}

}  // namespace conv_tiles
}  // namespace dynkernels
