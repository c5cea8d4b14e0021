// The implicit-GEMM kernel of channel_sparse_conv2d (host side and prologues:
// channel_sparse_conv2d_cuda.cu). One thread block computes a BM x BN tile of one sample's GEMM
//
//   C[m, p] = sum_k A[m, k] * B[k, p]       m: index into the sample's active output channels
//                                           p: output pixel oh * Wo + ow
//   k = (rs, j), rs = r * KW + s over the kernel window, j over the sample's active input channels
//   A[m, (rs, j)] = wt[out_list[m], rs, in_list[j]]            (wt: weight as [Cout, KH*KW, Cw])
//   B[(rs, j), p] = xb[n, oh*sh - ph + r*dh, ow*sw - pw + s*dw, j] (xb: NHWC, zero outside)
//
// so both the M and the K loops visit active channels only. The epilogue writes
// (C + bias) * out_gate to the tile's active channels and exact zeros to the inactive channels
// that fall in the tile's rows: rows m >= count(n) of the compacted list are the inactive
// channels (compact order: active ones, then inactive ones), so every output element is
// written exactly once and the output needs no memset.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

namespace dynkernels {
namespace conv_cuda {

// ---------------------------------------------------------------------------------- tiling
constexpr int BM = 64;        // output channels per block tile
constexpr int BN = 64;        // output pixels per block tile
constexpr int BK = 32;        // reduction elements per pipeline stage (one rs, 32 channels)
constexpr int THREADS = 128;  // 4 warps; tensor-core path: each warp owns a 64 x 16 strip
constexpr int LDC = 68;       // float row stride of the epilogue staging tile (BM == BN == 64)

// Operands in shared memory are stored k-contiguous: A as [BM][LDK] (row m) and B as [BN][LDK]
// (row p), i.e. A row-major and B column-major for WMMA. The padding of 8 (16-bit) or 4 (fp32)
// elements keeps every row 16-byte aligned (vector stores) and spreads rows over banks.
template <typename T> struct Tile {
  static constexpr int VEC = 16 / sizeof(T);                  // elements per 16-byte vector
  static constexpr int LDK = BK + (sizeof(T) == 2 ? 8 : 4);   // 40 (80 B) or 36 (144 B)
  static constexpr int EPT = BM * BK / THREADS;               // elements each thread loads per operand: 16
  static constexpr int NV = EPT / VEC;                        // 16-byte vectors per thread per operand
};
static_assert(BM == BN, "the loaders give one row of A and one row of B to every pair of threads");
static_assert(THREADS == 2 * BM && Tile<float>::EPT == BK / 2, "each thread loads half a row (16 elements)");
static_assert(BK == 32 && (THREADS / 32) * Tile<float>::EPT == BM,
              "gathered A loads: one lane per column, each warp loads EPT whole rows");

// Raw bit patterns of one element: loads and stores of the operands never do arithmetic, and
// all-zero bits are +0.0 in every supported dtype.
template <typename T> struct Bits;
template <> struct Bits<float> { using type = uint32_t; };
template <> struct Bits<c10::Half> { using type = uint16_t; };
template <> struct Bits<c10::BFloat16> { using type = uint16_t; };

// The element type the WMMA fragments see.
template <typename T> struct MmaType;
template <> struct MmaType<c10::Half> { using type = __half; };
template <> struct MmaType<c10::BFloat16> { using type = __nv_bfloat16; };

struct Params {
  const void* xb;         // [N, H, W, Cb] NHWC input; channel j < Cb (Cb % 8 == 0, 16-byte aligned rows)
  const void* wt;         // [Cout, KH*KW, Cw] weight (Cw % 8 == 0, entries Cin <= c < Cw are zero)
  const void* bias;       // [Cout] or nullptr
  const void* shift;      // [Cout] or nullptr: added after the gate scale
  const float* out_gate;  // [N, Cout] float32
  const int* out_list;    // [N, Cout] per sample: active output channels ascending, then inactive ones
  const int* out_count;   // [N] number of active output channels
  const int* in_list;     // [N, Cin] like out_list for the input channels; nullptr: all channels, j = c
  const int* in_count;    // [N] or nullptr (then every sample has Cin active input channels)
  void* y;                // [N, Cout, Ho, Wo], NCHW or channels_last (see y_channels_last)
  int N, Cin, H, W, Cb, Cout, KH, KW, Cw, Ho, Wo;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t y_sn, y_sc, y_sp;  // y strides of sample, channel and pixel (p = oh * Wo + ow)
  bool y_channels_last;      // epilogue walks channels fastest (NHWC) or pixels fastest (NCHW)
};

// Shared memory of one block: two pipeline stages of A and B, reused as the float staging tile
// of the epilogue once the main loop is done (a __syncthreads separates the two uses).
template <typename T> struct alignas(128) Smem {
  using Raw = typename Bits<T>::type;
  union {
    struct {
      Raw a[2][BM][Tile<T>::LDK];
      Raw b[2][BN][Tile<T>::LDK];
    } ab;
    float c[BM][LDC];  // [m][p] for NCHW output, [p][m] for channels_last output (BM == BN)
  };
  // Element offset in wt of the weight row of tile row m (channel out_list[m0 + m]), or -1 when
  // m0 + m is past the sample's active count. Used by the gathered A loads.
  int64_t a_row[BM];
};

// ------------------------------------------------------------------------ global -> registers
// Thread t loads row (t / 2) of the A tile and row (t / 2) of the B tile, elements
// [kseg, kseg + 16) of the tile's BK with kseg = (t % 2) * 16.
// One thread's share of one operand tile: NV 16-byte vectors, or EPT raw elements.
template <typename T> union Frag {
  uint4 v[Tile<T>::NV];
  typename Bits<T>::type e[Tile<T>::EPT];
};

template <typename T> struct Loader {
  using Raw = typename Bits<T>::type;
  static constexpr int VEC = Tile<T>::VEC, NV = Tile<T>::NV, EPT = Tile<T>::EPT;

  int kseg;
  // A: this thread's weight row (nullptr when the tile row is past the sample's active count).
  const Raw* w_row;
  // B: this thread's output pixel, as the top-left input coordinate of its window.
  bool pix_valid;
  int ih0, iw0;
  const Raw* x_sample;  // xb + n * H * W * Cb

  __device__ void init(const Params& P, int n, int m0, int p0, int count) {
    const int t = threadIdx.x;
    const int row = t >> 1;
    kseg = (t & 1) * EPT;
    const int m = m0 + row;
    w_row = nullptr;
    if (m < count) {
      const int oc = P.out_list[(int64_t)n * P.Cout + m];
      w_row = static_cast<const Raw*>(P.wt) + (int64_t)oc * P.KH * P.KW * P.Cw;
    }
    const int p = p0 + row;
    pix_valid = p < P.Ho * P.Wo;
    const int oh = pix_valid ? p / P.Wo : 0, ow = pix_valid ? p - (p / P.Wo) * P.Wo : 0;
    ih0 = oh * P.stride_h - P.pad_h;
    iw0 = ow * P.stride_w - P.pad_w;
    x_sample = static_cast<const Raw*>(P.xb) + (int64_t)n * P.H * P.W * P.Cb;
  }

  // A elements of stage (rs, j0).
  // Identity input list (in_list == nullptr): this thread's row, columns j0 + kseg + [0, 16), as
  // 16-byte vectors of wt, valid while j < Cw (Cw and j are multiples of VEC, so a vector is all
  // in or all out; wt is zero for Cin <= j < Cw).
  // Gathered list: lane l of warp w loads column j = j0 + l of rows w * 16 + i (i < 16), i.e.
  // wt[oc, rs, in_list[j]] for j < active count and zero past it. The 32 lanes of one load read
  // 32 ascending channels of a single weight row, one or two cache lines, where a thread-per-row
  // mapping would touch 16 rows.
  __device__ void load_a(const Params& P, const Smem<T>& sm, const int* in_list_n, int ca, int rs, int j0,
                         Frag<T>& ra) const {
    if (in_list_n == nullptr) {
      const int jb = j0 + kseg;
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int j = jb + v * VEC;
        if (w_row != nullptr && j < P.Cw)
          ra.v[v] = __ldg(reinterpret_cast<const uint4*>(w_row + (int64_t)rs * P.Cw + j));
        else
          ra.v[v] = make_uint4(0u, 0u, 0u, 0u);
      }
    } else {
      const Raw* wt = static_cast<const Raw*>(P.wt);
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      const int j = j0 + lane;
      const bool j_valid = j < ca;
      const int64_t col = (int64_t)rs * P.Cw + (j_valid ? __ldg(in_list_n + j) : 0);
#pragma unroll
      for (int i = 0; i < EPT; ++i) {
        const int64_t row = sm.a_row[warp * EPT + i];
        ra.e[i] = (j_valid && row >= 0) ? __ldg(wt + row + col) : Raw(0);
      }
    }
  }

  // B elements: 16-byte vectors of the NHWC input at this thread's pixel shifted by (r, s),
  // channels j0 + kseg + ... (valid while j < Cb; xb holds zeros for active count <= j < Cb).
  __device__ void load_b(const Params& P, int rs, int j0, Frag<T>& rb) const {
    const int r = rs / P.KW, s = rs - r * P.KW;
    const int ih = ih0 + r * P.dil_h, iw = iw0 + s * P.dil_w;
    const bool inside = pix_valid && ih >= 0 && ih < P.H && iw >= 0 && iw < P.W;
    const Raw* src = inside ? x_sample + ((int64_t)ih * P.W + iw) * P.Cb : x_sample;
    const int jb = j0 + kseg;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      const int j = jb + v * VEC;
      if (inside && j < P.Cb)
        rb.v[v] = __ldg(reinterpret_cast<const uint4*>(src + j));
      else
        rb.v[v] = make_uint4(0u, 0u, 0u, 0u);
    }
  }

  // Registers -> shared stage buf, A in the mapping load_a used (gathered: rows w * 16 + i, column l).
  __device__ void store(Smem<T>& sm, int buf, bool gathered, const Frag<T>& ra, const Frag<T>& rb) const {
    const int row = threadIdx.x >> 1;
    if (gathered) {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
      for (int i = 0; i < EPT; ++i) sm.ab.a[buf][warp * EPT + i][lane] = ra.e[i];
    } else {
#pragma unroll
      for (int v = 0; v < NV; ++v) *reinterpret_cast<uint4*>(&sm.ab.a[buf][row][kseg + v * VEC]) = ra.v[v];
    }
#pragma unroll
    for (int v = 0; v < NV; ++v) *reinterpret_cast<uint4*>(&sm.ab.b[buf][row][kseg + v * VEC]) = rb.v[v];
  }
};

// -------------------------------------------------------------------------------- compute
// step(sm, buf, rows, ks): rows = active rows left in the tile (count - m0, >= 1, may exceed BM),
// ks = active input channels left in the stage (ca - j0, >= 1, may exceed BK). Rows >= rows and
// columns k >= ks of a stage are zero (see Loader), so skipping them changes no result: their
// accumulators stay 0 and are never written out (the epilogue writes zeros for rows >= count).
// This brings the padding waste of a partly active tile down to 16 rows and 16 channels.

// Tensor cores (fp16 / bf16 inputs, fp32 accumulation): warp w owns the 64 x 16 strip of columns
// w * 16 as four WMMA 16x16x16 fragments stacked over the rows. Splitting the warps over the
// columns rather than the rows keeps them equally busy when the tail rows are skipped.
template <typename T> struct MmaCompute {
  using E = typename MmaType<T>::type;
  static constexpr int LDK = Tile<T>::LDK;
  static constexpr int FRAGS = BM / 16;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FRAGS];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < FRAGS; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.0f);
  }

  __device__ void step(const Smem<T>& sm, int buf, int rows, int ks) {
    using namespace nvcuda;
    const int wn = (threadIdx.x >> 5) * 16;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      if (kk >= ks) break;  // block-uniform
      wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, reinterpret_cast<const E*>(&sm.ab.b[buf][wn][kk]), LDK);
#pragma unroll
      for (int i = 0; i < FRAGS; ++i) {
        if (i * 16 >= rows) break;  // block-uniform
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> fa;
        wmma::load_matrix_sync(fa, reinterpret_cast<const E*>(&sm.ab.a[buf][i * 16][kk]), LDK);
        wmma::mma_sync(acc[i], fa, fb, acc[i]);
      }
    }
  }

  // Staging tile element (m, p) at c[m][p] (NCHW output) or c[p][m] (channels_last output).
  __device__ void stage(Smem<T>& sm, bool pixel_major) const {
    using namespace nvcuda;
    const int wn = (threadIdx.x >> 5) * 16;
#pragma unroll
    for (int i = 0; i < FRAGS; ++i) {
      if (pixel_major)
        wmma::store_matrix_sync(&sm.c[wn][i * 16], acc[i], LDC, wmma::mem_col_major);
      else
        wmma::store_matrix_sync(&sm.c[i * 16][wn], acc[i], LDC, wmma::mem_row_major);
    }
  }
};
static_assert(BN == (THREADS / 32) * 16, "tensor-core path: one 16-column strip per warp");

// fp32 inputs: exact fp32 FMAs on the CUDA cores (TF32 tensor cores would lose the 1e-5
// relative accuracy that fp32 callers expect). Thread (ty, tx) = (t / 16, t % 16) owns rows
// ty * 8 + i and columns tx + 16 * q.
struct FmaCompute {
  float acc[8][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][q] = 0.0f;
  }

  __device__ void step(const Smem<float>& sm, int buf, int rows, int ks) {
    (void)rows;  // all threads share every row group here: no warp-uniform saving
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
    const int kmax = ks < BK ? ks : BK;
#pragma unroll 4
    for (int kk = 0; kk < kmax; ++kk) {
      float a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = __uint_as_float(sm.ab.a[buf][ty * 8 + i][kk]);
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = __uint_as_float(sm.ab.b[buf][tx + 16 * q][kk]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][q] = fmaf(a[i], b[q], acc[i][q]);
    }
  }

  __device__ void stage(Smem<float>& sm, bool pixel_major) const {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int m = ty * 8 + i, p = tx + 16 * q;
        if (pixel_major)
          sm.c[p][m] = acc[i][q];
        else
          sm.c[m][p] = acc[i][q];
      }
  }
};

template <typename T> struct ComputeFor { using type = MmaCompute<T>; };
template <> struct ComputeFor<float> { using type = FmaCompute; };

// ---------------------------------------------------------------------------------- kernel
// grid: (ceil(Ho*Wo / BN), ceil(Cout / BM), N); block: THREADS. Sized for the worst case (all
// output channels active): a block whose rows are all past the sample's active count skips the
// GEMM and only writes the zeros of its inactive channels.
template <typename T>
__global__ void __launch_bounds__(THREADS) channel_sparse_conv2d_gemm_kernel(const Params P) {
  using Raw = typename Bits<T>::type;
  using Compute = typename ComputeFor<T>::type;
  __shared__ Smem<T> sm;

  const int n = blockIdx.z;
  const int m0 = blockIdx.y * BM;
  const int p0 = blockIdx.x * BN;
  const int count = P.out_count[n];  // 0 <= count <= Cout (written by the prologue)
  const int HWo = P.Ho * P.Wo;
  const bool pixel_major = P.y_channels_last;

  Compute comp;
  comp.zero();
  if (m0 < count) {  // block-uniform: the __syncthreads below are reached by all or none
    const int* in_list_n = P.in_list ? P.in_list + (int64_t)n * P.Cin : nullptr;
    const int ca = P.in_count ? P.in_count[n] : P.Cin;  // active input channels of this sample
    const int chunks = (ca + BK - 1) / BK;
    const int tiles = P.KH * P.KW * chunks;  // K tiles; 0 when no input channel is active

    const bool gathered = in_list_n != nullptr;
    Loader<T> ld;
    ld.init(P, n, m0, p0, count);
    Frag<T> ra, rb;
    if (threadIdx.x < BM) {
      const int m = m0 + threadIdx.x;
      sm.a_row[threadIdx.x] =
          m < count ? (int64_t)P.out_list[(int64_t)n * P.Cout + m] * P.KH * P.KW * P.Cw : int64_t(-1);
    }
    __syncthreads();  // a_row is read by other threads' gathered A loads

    // Register double buffering: the global loads of tile t + 1 are in flight while the
    // tensor cores work on tile t from shared memory. One __syncthreads per tile suffices:
    // buffer (t + 1) & 1 was last read in iteration t - 1, which every thread has finished
    // when it passes the barrier at the end of iteration t - 1.
    if (tiles > 0) {
      ld.load_a(P, sm, in_list_n, ca, 0, 0, ra);
      ld.load_b(P, 0, 0, rb);
      ld.store(sm, 0, gathered, ra, rb);
      __syncthreads();
    }
    for (int t = 0; t < tiles; ++t) {
      const bool more = t + 1 < tiles;
      if (more) {
        const int rs = (t + 1) / chunks, j0 = ((t + 1) - rs * chunks) * BK;
        ld.load_a(P, sm, in_list_n, ca, rs, j0, ra);
        ld.load_b(P, rs, j0, rb);
      }
      comp.step(sm, t & 1, count - m0, ca - (t - (t / chunks) * chunks) * BK);
      if (more) ld.store(sm, (t + 1) & 1, gathered, ra, rb);
      __syncthreads();  // also orders the last step's reads before the staging writes below
    }
    comp.stage(sm, pixel_major);
    __syncthreads();
  }

  // Epilogue: row m of the tile is output channel out_list[m]. Active rows (m < count) get
  // (acc + bias) * gate + shift, rows count <= m < Cout get exact zeros, rows >= Cout do not exist.
  // Consecutive threads walk channels (channels_last output) or pixels (NCHW output).
  const int* out_list_n = P.out_list + (int64_t)n * P.Cout;
  const float* gate_n = P.out_gate + (int64_t)n * P.Cout;
  T* y = static_cast<T*>(P.y) + (int64_t)n * P.y_sn;
  const T* bias = static_cast<const T*>(P.bias);
  const T* shift = static_cast<const T*>(P.shift);
#pragma unroll 4
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int mi = pixel_major ? (e % BM) : (e / BN);
    const int pi = pixel_major ? (e / BM) : (e % BN);
    const int m = m0 + mi, p = p0 + pi;
    if (m >= P.Cout || p >= HWo) continue;
    const int c = __ldg(out_list_n + m);
    float v = 0.0f;
    if (m < count) {
      const float acc = pixel_major ? sm.c[pi][mi] : sm.c[mi][pi];
      const float b = bias ? static_cast<float>(bias[c]) : 0.0f;
      v = (acc + b) * __ldg(gate_n + c) + (shift ? static_cast<float>(shift[c]) : 0.0f);
    }
    y[(int64_t)c * P.y_sc + (int64_t)p * P.y_sp] = static_cast<T>(v);
  }
}

}  // namespace conv_cuda
}  // namespace dynkernels
