// The implicit-GEMM kernel of channel_sparse_conv2d (host side and prologues:
// channel_sparse_conv2d_cuda.cu). The GEMM, the tile configurations and every index
// computation (swizzle, thread -> chunk, lane -> ldmatrix row, fragment -> staging element) are
// in channel_sparse_conv2d_tiles.h, where a CPU test checks them; this file is the data flow.
//
// One thread block computes a BM x BN tile (BM of sample n's compacted active output channels x
// BN output pixels) of one sample's GEMM, K = kernel taps x (active) input channels:
//  - Row table: the tile's output channels, their weight-row offsets, gates, bias and shift,
//    once per block in shared memory.
//  - Main loop (only when the tile has an active row): a STAGES-deep ring of shared-memory
//    stages filled by cp.async (16-byte LDGSTS with zero-fill for padding, rows past the active
//    count and the image border), STAGES - 1 K tiles in flight while the tensor cores work on
//    the oldest: ldmatrix.x4 (LDSM) from XOR-swizzled rows into mma.sync.m16n8k16 (HMMA) with
//    fp32 accumulators. With an input gate the A operand (the weight restricted to the
//    sample's active input channels) either comes compacted per sample by the host's prologue
//    (then it is read like an ungated weight) or, in the GATHER_K instantiations, is gathered
//    element by element: its global loads for stage t + STAGES - 1 are issued before the MMAs
//    of stage t and stored to shared memory after them. Warps whose rows are all past the active count, and fragments whose
//    pixels are past the image or whose channels are past the active input count, skip their
//    MMAs.
//  - Epilogue: the accumulators go through a padded fp32 staging tile (aliasing the ring) so
//    that the stores walk the output's contiguous dimension; active rows get
//    (acc + bias) * gate + shift, rows past the active count exact zeros (they are the inactive
//    channels: compacted lists hold the active channels first, then the inactive ones), so every
//    output element is written exactly once and the output needs no memset. Tiles whose rows are
//    all inactive only write their zeros.
// fp32 input runs the same pipeline with exact fp32 FMAs on the CUDA cores (FmaCompute).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "channel_sparse_conv2d_tiles.h"

namespace dynkernels {
namespace conv_cuda {

using namespace conv_tiles;

// Raw bit patterns of one element: loads and stores of the operands never do arithmetic, and
// all-zero bits are +0.0 in every supported dtype.
template <typename T> struct Bits;
template <> struct Bits<float> { using type = uint32_t; };
template <> struct Bits<c10::Half> { using type = uint16_t; };
template <> struct Bits<c10::BFloat16> { using type = uint16_t; };

// ------------------------------------------------------------------------------ PTX
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zeros (and no global read) when !valid.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most `pending` of this thread's committed groups are still in flight.
template <int pending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// v, opaque to the optimizer: a value computed once stays in its register instead of being
// recomputed from threadIdx in every iteration of the main loop (which the compiler otherwise
// prefers for the ldmatrix addresses, at some 30 instructions per stage).
template <typename I> __device__ __forceinline__ I keep_in_register(I v) {
  static_assert(sizeof(I) == 4, "one 32-bit register");
  asm volatile("" : "+r"(v));
  return v;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 fragment (a: row-major 16 x 16, b: 16 x 8 k-contiguous). Not
// volatile: it only reads and writes registers, so the compiler may interleave it with the
// (volatile, hence ordered) ldmatrix loads of the next k step.
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <> __device__ __forceinline__ void mma_16816<c10::Half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<c10::BFloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ------------------------------------------------------------------------------ compute
// step(a, b, rows, cols, ks): one stage's MMAs. a, b: the stage's A and B tiles in shared
// memory; rows = active rows left in the tile (count - m0 >= 1), cols = valid pixels left
// (Ho * Wo - p0 >= 1), ks = reduction elements left in the stage (>= 1). A rows >= rows, B rows
// >= cols and columns >= ks are zero in shared memory, so skipping them changes no result.
// Skipped: k16 steps past ks, the m16 fragments past rows, and warps past rows or cols.

// Tensor cores: warp (wm, wn) owns MT x NT m16n8 fragments (its warp tile); per k16 step it
// loads MT A fragments and NT / 2 pairs of B fragments with ldmatrix.x4.
template <typename T, int CFG> struct MmaCompute {
  using Raw = typename Bits<T>::type;
  static constexpr TileConfig tile = kTileConfigs[CFG];
  static constexpr int WTM = tile.bm / tile.warps_m, WTN = tile.bn / tile.warps_n;
  static constexpr int MT = WTM / 16, NT = WTN / 8, CPR = tile.bk / 8;
  float acc[MT][NT][4];
  Coord w;                 // the warp tile's first row and pixel
  uint32_t a_lane, b_lane;  // this lane's ldmatrix addresses (bytes in a stage) at fragment 0, k step 0

  // Zero accumulators; the lane's ldmatrix addresses, once (ldmatrix_address steps them).
  __device__ __forceinline__ void init() {
    const int lane = threadIdx.x & 31;
    w = warp_origin(threadIdx.x >> 5, tile.bm, tile.bn, tile.warps_m, tile.warps_n);
    const Coord la = ldmatrix_a_lane(lane), lb = ldmatrix_b_lane(lane);
    a_lane = keep_in_register(16u * swizzled_chunk(w.row + la.row, la.col, CPR));
    b_lane = keep_in_register(16u * swizzled_chunk(w.col + lb.row, lb.col, CPR));
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
  }

  __device__ __forceinline__ void step(const Raw* a, const Raw* b, int rows, int cols, int ks) {
    if (w.row >= rows || w.col >= cols) return;  // warp-uniform: nothing of this warp is active
    const uint32_t a_base = smem_u32(a), b_base = smem_u32(b);
#pragma unroll
    for (int kk = 0; kk < tile.bk / 16; ++kk) {
      if (kk * 16 >= ks) break;  // block-uniform
      uint32_t af[MT][4];
      uint32_t bf[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
        if (w.row + mi * 16 < rows) ldmatrix_x4(af[mi], a_base + ldmatrix_address(a_lane, mi, kk, CPR));
#pragma unroll
      for (int nj = 0; nj < NT / 2; ++nj) {
        uint32_t r[4];
        ldmatrix_x4(r, b_base + ldmatrix_address(b_lane, nj, kk, CPR));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
        if (w.row + mi * 16 < rows)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
    }
  }

  // Accumulators -> staging tile (every element of the warp tile, skipped fragments hold 0).
  __device__ __forceinline__ void stage(float* st, bool pixel_major) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = w.row + mi * 16 + acc_row(lane, e), p = w.col + ni * 8 + acc_col(lane, e);
          st[staging_offset(m, p, pixel_major, tile.bm, tile.bn)] = acc[mi][ni][e];
        }
  }
};

// fp32: exact FMAs on the CUDA cores. Thread (ty, tx) = (t / 16, t % 16) owns rows ty + 8 i and
// pixels tx + 16 q; per 4 k it reads 8 + 4 float4 chunks for 128 FMAs.
struct FmaCompute {
  using Raw = uint32_t;
  static constexpr TileConfig tile = kFmaTileConfig;
  static constexpr int CPR = tile.bk / 4;
  static_assert(threads_of(tile) == 128 && tile.bm == 64 && tile.bn == 64, "the thread mapping below");
  float acc[8][4];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][q] = 0.0f;
  }

  __device__ __forceinline__ void step(const Raw* a, const Raw* b, int /*rows*/, int /*cols*/, int ks) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll 2
    for (int kc = 0; kc < CPR; ++kc) {
      if (kc * 4 >= ks) break;  // block-uniform
      float4 av[8], bv[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) av[i] = *reinterpret_cast<const float4*>(a + 4 * swizzled_chunk(ty + 8 * i, kc, CPR));
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = *reinterpret_cast<const float4*>(b + 4 * swizzled_chunk(tx + 16 * q, kc, CPR));
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          acc[i][q] = fmaf(av[i].x, bv[q].x, acc[i][q]);
          acc[i][q] = fmaf(av[i].y, bv[q].y, acc[i][q]);
          acc[i][q] = fmaf(av[i].z, bv[q].z, acc[i][q]);
          acc[i][q] = fmaf(av[i].w, bv[q].w, acc[i][q]);
        }
    }
  }

  __device__ __forceinline__ void stage(float* st, bool pixel_major) const {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) st[staging_offset(ty + 8 * i, tx + 16 * q, pixel_major, 64, 64)] = acc[i][q];
  }
};

// Sizes of one kernel instantiation.
template <typename T, typename Compute> struct Layout {
  using Raw = typename Bits<T>::type;
  static constexpr TileConfig C = Compute::tile;
  static_assert(is_valid_config(C, sizeof(Raw)), "see is_valid_config");
  static constexpr StageSplit split = stage_split(C, sizeof(Raw));
  static constexpr int BM = C.bm, BN = C.bn, BK = C.bk, STAGES = C.stages, THREADS = threads_of(C);
  static constexpr int VEC = split.vec, CPR = split.cpr;
  static constexpr int A_CHUNKS = split.a_chunks, B_CHUNKS = split.b_chunks, A_PAIRS = split.a_pairs;
  static constexpr int STAGE_A = BM * BK, STAGE_B = BN * BK;  // elements per stage
  static constexpr int SMEM = smem_bytes(C, sizeof(Raw));
  static constexpr int ROWS_AT = row_table_offset(C, sizeof(Raw));
};

// ------------------------------------------------------------------------------ kernel
// grid: (ceil(Ho*Wo / BN), ceil(Cout / BM), N); block: THREADS; dynamic shared memory:
// Layout::SMEM. Sized for the worst case (all output channels active): a block whose rows are
// all past the sample's active count skips the main loop and writes the zeros of its rows.
template <typename T, typename Compute, bool GATHER_K>
__global__ void __launch_bounds__(threads_of(Compute::tile)) channel_sparse_conv2d_gemm_kernel(const Params P) {
  using L = Layout<T, Compute>;
  using Raw = typename L::Raw;
  extern __shared__ __align__(128) unsigned char smem[];
  Raw* const sA = reinterpret_cast<Raw*>(smem);    // [STAGES][BM * BK], swizzled rows
  Raw* const sB = sA + L::STAGES * L::STAGE_A;      // [STAGES][BN * BK], swizzled rows
  float* const staging = reinterpret_cast<float*>(smem);  // after the main loop
  RowInfo* const row_info = reinterpret_cast<RowInfo*>(smem + L::ROWS_AT);

  const int tid = threadIdx.x;
  const int n = blockIdx.z, m0 = blockIdx.y * L::BM, p0 = blockIdx.x * L::BN;
  const int count = P.out_count[n];  // 0 <= count <= Cout (written by the prologue)
  const int HWo = P.Ho * P.Wo;
  const int taps = P.KH * P.KW;

  for (int m = tid; m < L::BM; m += L::THREADS) {
    RowInfo r{-1, -1, 0.0f, 0.0f, 0.0f};
    if (m0 + m < P.Cout) {
      r.channel = P.out_list[(int64_t)n * P.Cout + m0 + m];
      if (m0 + m < count) {
        r.w_off = weight_row_offset(P, m0 + m, r.channel);  // < 2^31: checked by the host
        r.gate = P.out_gate[(int64_t)n * P.Cout + r.channel];
        r.bias = P.bias ? static_cast<float>(static_cast<const T*>(P.bias)[r.channel]) : 0.0f;
        r.shift = P.shift ? static_cast<float>(static_cast<const T*>(P.shift)[r.channel]) : 0.0f;
      }
    }
    row_info[m] = r;
  }
  __syncthreads();

  if (m0 < count) {  // block-uniform: the barriers inside are reached by all threads or none
    const Raw* const wt = static_cast<const Raw*>(P.wt) + n * P.w_sample_stride;
    const Raw* const xb = static_cast<const Raw*>(P.xb);
    const int* const in_list_n = GATHER_K ? P.in_list + (int64_t)n * P.Cin : nullptr;
    const int ca = P.in_count ? P.in_count[n] : P.Cin;  // reduction channels per tap
    const int chunks = (ca + L::BK - 1) / L::BK;
    const int tiles = taps * chunks;  // K tiles; 0 when no input channel is active
    const int rows = count - m0, cols = HWo - p0;

    // Per-thread copy state, constant over the K loop: the weight-row offsets of its A chunks
    // (-1: inactive row), the window origins and pixel offsets of its B chunks (a bit per valid
    // pixel), its chunk column and its destinations. Per stage, only the block-uniform tap and
    // channel offsets are added.
    int a_off[L::A_CHUNKS];
    Coord b_origin[L::B_CHUNKS];
    int b_off[L::B_CHUNKS];
    uint32_t b_pixel_valid = 0;
    const Coord q0 = load_chunk(tid, 0, L::THREADS, L::CPR);  // round i: row q0.row + i * THREADS / CPR
    const int col = q0.col * L::VEC;                          // the chunk's first channel within a stage
#pragma unroll
    for (int i = 0; i < L::A_CHUNKS; ++i) {
      const int w_off = row_info[load_chunk(tid, i, L::THREADS, L::CPR).row].w_off;
      a_off[i] = w_off < 0 ? -1 : w_off + col;
    }
#pragma unroll
    for (int i = 0; i < L::B_CHUNKS; ++i) {
      const int p = p0 + load_chunk(tid, i, L::THREADS, L::CPR).row;
      b_origin[i] = window_origin(P, p < HWo ? p : 0);
      b_off[i] = b_pixel_offset(P, b_origin[i]) + col;
      b_pixel_valid |= uint32_t(p < HWo) << i;
    }
    const uint32_t dst0 = 16u * swizzled_chunk(q0.row, q0.col, L::CPR);
    const uint32_t sA_u32 = smem_u32(sA), sB_u32 = smem_u32(sB);
    const Raw* const x_n = xb + (int64_t)n * P.H * P.W * P.Kc;

    // K tile kt -> ring slot: cp.async of B (and of A without an input gate). The offsets are
    // a_chunk_offset and b_chunk_offset (channels_sparse_conv2d_tiles.h) in their split form.
    auto issue = [&](int slot, const KTileIter& kt) {
      const bool j_inside = kt.j0 + col < P.Kc;
      if (!GATHER_K) {
        const uint32_t dst = sA_u32 + slot * (L::STAGE_A * sizeof(Raw)) + dst0;
        const int stage_off = kt.rs * P.Kc + kt.j0;
#pragma unroll
        for (int i = 0; i < L::A_CHUNKS; ++i) {
          const bool valid = j_inside && a_off[i] >= 0;  // then the offset is >= 0: unsigned, no sign extension
          cp_async_16(dst + 16u * i * L::THREADS, wt + (valid ? uint32_t(a_off[i] + stage_off) : 0u), valid);
        }
      }
      const uint32_t dst = sB_u32 + slot * (L::STAGE_B * sizeof(Raw)) + dst0;
      const int stage_off = b_tap_offset(P, kt.r, kt.s) + kt.j0;
#pragma unroll
      for (int i = 0; i < L::B_CHUNKS; ++i) {
        const bool valid = j_inside && ((b_pixel_valid >> i) & 1u) && b_tap_inside(P, b_origin[i], kt.r, kt.s);
        cp_async_16(dst + 16u * i * L::THREADS, x_n + (valid ? uint32_t(b_off[i] + stage_off) : 0u), valid);
      }
    };

    // Input-gated A: this thread's A_PAIRS element pairs of K tile kt, global -> registers (one
    // 32-bit word per pair of 16-bit elements) -> ring slot.
    using Pair = std::conditional_t<sizeof(Raw) == 2, uint32_t, uint2>;
    Pair gathered[GATHER_K ? L::A_PAIRS : 1];
    const int pair_col = gather_pair(tid, 0, L::THREADS, L::BK).col;  // the same for every i
    const int* const in_cols = GATHER_K ? in_list_n + pair_col : nullptr;
    auto fetch = [&](const KTileIter& kt) {
      const int left = ca - pair_col - kt.j0;  // this thread's columns j0 + pair_col + {0, 1} exist while < ca
      const int c0 = left > 0 ? __ldg(in_cols + kt.j0) : -1, c1 = left > 1 ? __ldg(in_cols + kt.j0 + 1) : -1;
#pragma unroll
      for (int i = 0; i < L::A_PAIRS; ++i) {
        const int w_off = row_info[gather_pair(tid, i, L::THREADS, L::BK).row].w_off;
        const int o0 = a_element_offset(P, w_off, kt.rs, c0), o1 = a_element_offset(P, w_off, kt.rs, c1);
        const Raw v0 = o0 >= 0 ? __ldg(wt + o0) : Raw(0), v1 = o1 >= 0 ? __ldg(wt + o1) : Raw(0);
        if constexpr (sizeof(Raw) == 2)
          gathered[i] = uint32_t(v0) | (uint32_t(v1) << 16);
        else
          gathered[i] = make_uint2(v0, v1);
      }
    };
    auto put = [&](int slot) {
      Raw* const a = sA + slot * L::STAGE_A;
#pragma unroll
      for (int i = 0; i < L::A_PAIRS; ++i) {
        const Coord e = gather_pair(tid, i, L::THREADS, L::BK);
        *reinterpret_cast<Pair*>(a + swizzled_chunk(e.row, e.col / L::VEC, L::CPR) * L::VEC + e.col % L::VEC) =
            gathered[i];
      }
    };

    Compute comp;
    comp.init();
    // Prologue: K tiles 0 .. STAGES - 2 into slots 0 .. STAGES - 2, one commit group each (empty
    // groups past the last tile keep the group count uniform for cp_async_wait).
    KTileIter next = KTileIter::first();  // the next K tile to issue
#pragma unroll
    for (int s = 0; s < L::STAGES - 1; ++s) {
      if (s < tiles) {
        issue(s, next);
        if (GATHER_K) {
          fetch(next);
          put(s);
        }
        next.next(chunks, L::BK, P.KW);
      }
      cp_async_commit();
    }
    // Iteration t: wait for tile t (at most STAGES - 2 younger groups pending), barrier (tile t
    // is visible to all threads, and all threads are done with tile t - 1, whose slot is the one
    // refilled now), issue tile t + STAGES - 1 into that slot, then the MMAs of tile t.
    int read_slot = 0, write_slot = L::STAGES - 1;
    int j_read = 0;  // j0 of tile t
    for (int t = 0; t < tiles; ++t) {
      cp_async_wait<L::STAGES - 2>();
      __syncthreads();
      const bool more = t + L::STAGES - 1 < tiles;
      if (more) {
        issue(write_slot, next);
        if (GATHER_K) fetch(next);
      }
      cp_async_commit();
      comp.step(sA + read_slot * L::STAGE_A, sB + read_slot * L::STAGE_B, rows, cols, ca - j_read);
      // Slot write_slot is next read in iteration t + STAGES - 1 >= t + 2, after the barrier of t + 1.
      if (more) {
        if (GATHER_K) put(write_slot);
        next.next(chunks, L::BK, P.KW);
      }
      j_read = j_read + L::BK < chunks * L::BK ? j_read + L::BK : 0;
      read_slot = read_slot + 1 == L::STAGES ? 0 : read_slot + 1;
      write_slot = write_slot + 1 == L::STAGES ? 0 : write_slot + 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every thread is done reading the ring, which the staging tile overwrites
    comp.stage(staging, P.pixel_major);
  }
  __syncthreads();

  // Epilogue: row m of the tile is output channel row_info[m].channel.
  T* const y = static_cast<T*>(P.y) + (int64_t)n * P.y_sn;
#pragma unroll 4
  for (int e = tid; e < L::BM * L::BN; e += L::THREADS) {
    const Coord q = epilogue_element(e, P.pixel_major, L::BM, L::BN);
    const RowInfo& r = row_info[q.row];
    const int p = p0 + q.col;
    if (r.channel < 0 || p >= HWo) continue;
    float v = 0.0f;  // rows past the active count: the inactive channels' exact zeros
    if (r.w_off >= 0)
      v = (staging[staging_offset(q.row, q.col, P.pixel_major, L::BM, L::BN)] + r.bias) * r.gate + r.shift;
    y[(int64_t)r.channel * P.y_sc + (int64_t)p * P.y_sp] = static_cast<T>(v);
  }
}

}  // namespace conv_cuda
}  // namespace dynkernels
