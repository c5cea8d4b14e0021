// The arithmetic of the CPU channel-sparse convolution: for one sample, every active output
// channel j and every output pixel p,
//
//   c[j][p] = (sum_{k < depth} a_j[a_off[k]] * b[b_off[k] + p] + bias[j]) * scale[j] + shift[j]
//
// k runs over the (active input channel, tap) pairs. a_j = a + a_row[j]: the weight of output
// channel co[j] (read in place, in the weight's own layout: a_off[k] is the offset of input
// channel ci's tap t in it, ci * taps + t for a contiguous weight); b: the sample's input laid
// out so that every (channel, tap) pair is one contiguous run of P pixels starting at b_off[k]
// (an im2col, a row-shift buffer or, for a 1x1 conv, x itself); c + c_row[j]: output row j (P
// contiguous values: an NCHW y itself, or a buffer). Weights are broadcast from where they lie,
// nothing is gathered per sample; pixels run along the vector lanes. The pairs are listed one
// by one (two tables of depth entries, in L1) rather than as channels times taps, so that the
// reduction is one flat loop: nested, the loop overhead of each channel cost 5% of the rate of
// a 3x3 layer and 20% of a 1x1 one.
//
// Why a micro-kernel of its own (measured on an AMD EPYC, Zen 4, 1 thread): at::mm goes to MKL,
// which does not use AVX-512 on that CPU (65 GFLOP/s against 105 - 110 for oneDNN's dense conv),
// torch does not export oneDNN's API to extensions, and a oneDNN conv per sample on gathered
// weights is slower than the dense conv itself; this kernel runs at 97% of the FMA peak there.
// On an Intel Xeon with AVX-512 and AMX (2 cores) it reaches 99% of the measured FMA peak
// (237 of 240 GFLOP/s per core) on one 128 -> 128, 3x3, 16x16 sample from L2.
//
// One register-blocked micro-kernel (a tile of rows x vectors of pixels held in registers over
// the whole reduction) is compiled once per instruction set: AVX-512, AVX2 + FMA (both with
// per-function target attributes, so the library runs on any x86-64) and portable C++. The
// widest one the CPU has is picked at run time, the one torch itself uses for its kernels
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY=avx2 / default lowers).
#pragma once

#include <cstdint>

namespace dynkernels {
namespace cpu_conv {

// The float32 lanes of an AVX-512 vector: where the kernel puts a sample's active output
// channels in the lanes (PixelRowsConv), its work grows in steps of this many channels
// (dynkernels.ops._conv_cpu_auto.CPU_KERNEL_LANES, and the lane density backend="auto" reads).
constexpr int64_t kFloatLanes = 16;

template <typename T>
struct GemmProblem {
  int64_t rows;    // active output channels (kout)
  int64_t pixels;  // P = Ho * Wo
  int64_t depth;   // (active input channel, tap) pairs: kin * kh * kw
  int64_t panel;   // pixels per panel: the pixels whose part of b fits in L2 (any value >= pixels: one)
  const T* a;
  const int64_t* a_row;  // [rows]
  const int64_t* a_off;  // [depth]
  const T* b;
  const int64_t* b_off;  // [depth]
  const T* bias;   // [rows], or [pixels] where per_column
  const T* scale;  // [rows], or [pixels] where per_column
  const T* shift;  // [rows], or [pixels] where per_column
  T* c;
  const int64_t* c_row;  // [rows]
  // The same product with the roles swapped (channels_last input): rows are output pixels
  // (a_j: the sample's input pixels), the vector lanes run over the active output channels
  // (b: their weights, gathered per sample), and bias, scale and shift belong to the columns.
  bool per_column = false;
  // Where the pairs come in runs of `run` (> 0; depth is a multiple of it) along which
  // b_off[k0 + i] = b_off[k0] + i * b_step for every run start k0, and, where a_even,
  // a_off[k0 + i] = a_off[k0] + i * a_step too, the micro-kernel walks each run without reading
  // those offsets from the tables (which still hold every entry).
  int64_t run = 0, a_step = 0, b_step = 0;
  bool a_even = false;
};

// Computes a GemmProblem with the fastest micro-kernel this CPU has.
template <typename T>
void run_gemm(const GemmProblem<T>& problem);

// planes[i * ld + p] = src[p * pixel_stride + chan[i]] for i < kin, p < pixels: the channels
// chan (increasing, < channels) of channels_last pixels as planes, i.e. a transpose (in
// registers, a vector-width square at a time).
void gather_planes(const float* src, int64_t pixel_stride, int64_t channels, const int32_t* chan, int64_t kin,
                   int64_t pixels, float* planes, int64_t ld);

// The row-shift buffer of a stride-1 conv with "same"-width rows (W + 2 * pw = dw * (kw - 1) + W)
// straight from channels_last pixels, without planes in between:
// rows[(i * kw + kx) * plane + r * W + w] = src[((r - ph) * W + w + kx * dw - pw) * pixel_stride + chan[i]],
// 0 where that pixel is outside the H x W input (r < H + 2 * ph; plane >= (H + 2 * ph) * W).
void gather_row_shift(const float* src, int64_t pixel_stride, int64_t channels, const int32_t* chan, int64_t kin,
                      int64_t H, int64_t W, int64_t kw, int64_t ph, int64_t pw, int64_t dw, float* rows, int64_t plane);

// The same row-shift buffer from dense planes (NCHW): channel i's plane at src + chan[i] * sc,
// its H rows of W values contiguous. Returns false (and writes nothing) where this CPU's
// micro-kernel has no such copy (then the caller lays the buffer out itself).
bool row_shift_planes(const float* src, const int32_t* chan, int64_t sc, int64_t kin, int64_t H, int64_t W, int64_t kw,
                      int64_t ph, int64_t pw, int64_t dw, float* rows, int64_t plane);

// pixels_out[p * pixel_stride + c] = rows[off[c] + p] for c < channels, p < pixels: planes back
// to channels_last pixels (the transpose of gather_planes), each channel's row at its own
// offset (channels may share one, e.g. a row of zeros).
void scatter_planes(const float* rows, const int64_t* off, int64_t channels, int64_t pixels, float* pixels_out,
                    int64_t pixel_stride);

// The values of one row's active columns, in order, packed into dst: bit l of mask[b] says
// whether column 16 b + l (of ncols) is active. dst gets as many values as there are active
// columns, and up to 15 more past them may be overwritten. With the AVX-512 and the AVX2
// micro-kernels only (with portable code PixelRowsConv, which needs these two, does not run).
void compress_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst);

// The inverse, with zeros: dst[c] = the next value of src for each active column c, else +0,
// for every c < ncols. src may be read up to 15 values past its last active one.
void expand_row(const float* src, const uint16_t* mask, int64_t ncols, float* dst);

// Name of the micro-kernel run_gemm uses ("avx512", "avx2" or "portable").
const char* gemm_isa();

}  // namespace cpu_conv
}  // namespace dynkernels
