// CPU kernel for channel_sparse_conv2d (contract: DESIGN.md).
//
// Per sample n: list its active input channels (in_gate > 0, all when there is no in_gate)
// and active output channels (out_gate > 0); lay out only the active input channels so that
// every (channel, tap) pair is one contiguous run of output pixels (stride 1: a row-shift
// buffer, see row_shift; other strides: an im2col; a 1x1 conv of NCHW
// x: x itself); then one register-blocked micro-kernel (conv_gemm.h: AVX-512, AVX2 or portable,
// picked at run time) multiplies them with the weights of the active (output, input) pairs,
// read in place, and applies bias, gate scale and shift on the way out. Inactive output
// channels are written as exact zeros. FLOPs: kout * kin * kh * kw * Ho * Wo per sample.
// float16 and bfloat16 are computed in float32 and rounded once. float32 channels_last layers
// that are strided or large run the same micro-kernel with the roles swapped (PixelRowsConv).
// Samples run in parallel (claimed one by one by the threads of at::parallel_for); with fewer
// samples than threads, each sample's output channels are split among the threads instead.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <new>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../layout.h"
#include "conv_gemm.h"

namespace dynkernels {
namespace {

using at::Tensor;

// Active positions (gate > 0) of each row of a [N, C] gate, as per-row index lists.
std::vector<std::vector<int32_t>> active_lists(const Tensor& gate) {
  const Tensor g = gate.to(at::kDouble).contiguous();  // bool and every float dtype compare alike
  const double* gp = g.const_data_ptr<double>();
  const int64_t N = g.size(0), C = g.size(1);
  std::vector<std::vector<int32_t>> lists(N);
  for (int64_t n = 0; n < N; ++n) {
    lists[n].reserve(C);
    for (int64_t c = 0; c < C; ++c)
      if (gp[n * C + c] > 0.0) lists[n].push_back(static_cast<int32_t>(c));
  }
  return lists;
}

struct ConvGeometry {
  int64_t H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

// Range [lo, hi) of output positions o with 0 <= o*s - p + k*d < size.
inline void valid_range(int64_t size, int64_t out, int64_t s, int64_t p, int64_t kd, int64_t& lo, int64_t& hi) {
  const int64_t off = kd - p;  // input position = o*s + off
  lo = off >= 0 ? 0 : (-off + s - 1) / s;
  hi = size - off <= 0 ? 0 : (size - off - 1) / s + 1;
  lo = std::min(lo, out);
  hi = std::max(lo, std::min(hi, out));
}

// Row stride of a buffer of rows of n values: a whole number of 64-byte lines, and an odd
// one, so that walking down a column does not hit the same few cache sets over and over (a
// row of 256 floats is 1 KiB: 16 such rows share 4 of the 64 sets of a 32 KiB L1).
template <typename T>
int64_t padded_stride(int64_t n) {
  constexpr int64_t line = 64 / sizeof(T);
  const int64_t lines = (n + line - 1) / line;
  return (lines | 1) * line;
}

// dst[k] = src[k * step] for k < count.
template <typename S, typename T>
inline void copy_run(T* dst, const S* src, int64_t count, int64_t step) {
  if (step == 1) {
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(src[k]);
  } else if (step == 2) {  // (a constant step, which the compiler vectorises: stride-2 convs of NCHW x)
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(src[2 * k]);
  } else {
    for (int64_t k = 0; k < count; ++k) dst[k] = static_cast<T>(src[k * step]);
  }
}

// The active input channels of one sample as planes: channel i is src + chan[i] * sc, its
// rows sy apart and its columns sx apart.
template <typename S>
struct Planes {
  const S* src;
  const int32_t* chan;
  int64_t sc, sy, sx;
  const S* plane(int64_t i) const { return src + static_cast<int64_t>(chan[i]) * sc; }
};

// cols[((i*kh + ky)*kw + kx) * ld + oh*Wo + ow] = x[i, oh*sh - ph + ky*dh, ow*sw - pw + kx*dw]
// (0 outside the input): an im2col of the kin planes, rows ld >= Ho * Wo apart.
template <typename S, typename T>
void im2col(const Planes<S>& x, int64_t kin, const ConvGeometry& g, int64_t ld, T* cols) {
  const int64_t P = g.Ho * g.Wo;
  for (int64_t i = 0; i < kin; ++i) {
    const S* xc = x.plane(i);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      int64_t oh_lo, oh_hi;
      valid_range(g.H, g.Ho, g.sh, g.ph, ky * g.dh, oh_lo, oh_hi);
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        int64_t ow_lo, ow_hi;
        valid_range(g.W, g.Wo, g.sw, g.pw, kx * g.dw, ow_lo, ow_hi);
        T* row = cols + ((i * g.kh + ky) * g.kw + kx) * ld;
        std::fill(row, row + oh_lo * g.Wo, T(0));
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          T* dst = row + oh * g.Wo;
          const S* src = xc + (oh * g.sh - g.ph + ky * g.dh) * x.sy + (kx * g.dw - g.pw) * x.sx;
          std::fill(dst, dst + ow_lo, T(0));
          copy_run(dst + ow_lo, src + ow_lo * g.sw * x.sx, ow_hi - ow_lo, g.sw * x.sx);
          std::fill(dst + ow_hi, dst + g.Wo, T(0));
        }
        std::fill(row + oh_hi * g.Wo, row + P, T(0));
      }
    }
  }
}

// Stride 1: the "row-shift" buffer instead of an im2col. rows[(i*kw + kx)*plane + r*Wo + ow]
// holds input channel i's zero-padded row r (Hp = H + 2*ph of them) shifted by kx*dw - pw:
// x[i, r - ph, ow + kx*dw - pw]. Output pixel (oh, ow) at tap (ky, kx) reads it at row
// oh + ky*dh, so over all pixels the tap is one contiguous run of Ho*Wo values starting at
// ky*dh*Wo: no wasted columns, and kh times less buffer than an im2col. plane >= Hp * Wo.
template <typename S, typename T>
void row_shift(const Planes<S>& x, int64_t kin, const ConvGeometry& g, int64_t plane, T* rows) {
  // With "same" width (Wo == W) and dense planes, the H shifted rows are one shifted copy of
  // the whole plane, then the few columns that wrapped into the neighbouring row are zeroed.
  const bool flat = x.sx == 1 && x.sy == g.W && g.Wo == g.W;
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (flat && cpu_conv::row_shift_planes(x.src, x.chan, x.sc, kin, g.H, g.W, g.kw, g.ph, g.pw, g.dw, rows, plane))
      return;
  }
  const int64_t HW = g.H * g.W;
  for (int64_t i = 0; i < kin; ++i) {
    const S* src = x.plane(i);
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      int64_t ow_lo, ow_hi;  // output columns whose input column ow + kx*dw - pw is inside
      valid_range(g.W, g.Wo, 1, g.pw, kx * g.dw, ow_lo, ow_hi);
      const int64_t shift = kx * g.dw - g.pw;
      T* dst = rows + (i * g.kw + kx) * plane;
      std::fill(dst, dst + g.ph * g.Wo, T(0));
      std::fill(dst + (g.ph + g.H) * g.Wo, dst + (2 * g.ph + g.H) * g.Wo, T(0));
      T* mid = dst + g.ph * g.Wo;
      if (flat) {
        const int64_t k0 = std::clamp<int64_t>(-shift, 0, HW), k1 = std::clamp<int64_t>(HW - shift, k0, HW);
        std::fill(mid, mid + k0, T(0));
        copy_run(mid + k0, src + k0 + shift, k1 - k0, 1);
        std::fill(mid + k1, mid + HW, T(0));
        if (ow_lo > 0 || ow_hi < g.W)
          for (int64_t h = 0; h < g.H; ++h) {
            std::fill(mid + h * g.W, mid + h * g.W + ow_lo, T(0));
            std::fill(mid + h * g.W + ow_hi, mid + (h + 1) * g.W, T(0));
          }
        continue;
      }
      for (int64_t h = 0; h < g.H; ++h) {
        T* drow = mid + h * g.Wo;
        const S* srow = src + h * x.sy + shift * x.sx;
        std::fill(drow, drow + ow_lo, T(0));
        copy_run(drow + ow_lo, srow + ow_lo * x.sx, ow_hi - ow_lo, x.sx);
        std::fill(drow + ow_hi, drow + g.Wo, T(0));
      }
    }
  }
}

// Sets pr.run to `run` where pr's pixel offsets step evenly within every run of that many pairs
// (conv_gemm.h), and a_even where its weight offsets do too; else leaves run 0. The pairs of one
// tap over a sample's active input channels step evenly through b wherever b holds those
// channels alone (a row-shift buffer, an im2col, a channel-compact copy), and through the
// weights where those channels are consecutive (no input gate). Then a step of the micro-kernel
// loads its pixels and weights and not also their offsets: 2 of the 9 loads per step of the
// AVX2 tile, whose load ports bounded its rate (on an AMD EPYC, Zen 2: 4 - 18% less time per
// channels_last conv, e.g. 15.4 -> 14.4 ms at 32, 128 -> 128, 3x3, 16x16, output density 0.5).
// Runs shorter than 8 are not worth their loop.
template <typename T>
void mark_even_runs(cpu_conv::GemmProblem<T>& pr, int64_t run) {
  if (run < 8 || pr.depth % run != 0) return;
  const int64_t a_step = pr.a_off[1] - pr.a_off[0], b_step = pr.b_off[1] - pr.b_off[0];
  bool a_even = true;
  for (int64_t k0 = 0; k0 < pr.depth; k0 += run)
    for (int64_t i = 1; i < run; ++i) {
      if (pr.b_off[k0 + i] != pr.b_off[k0] + i * b_step) return;
      a_even = a_even && pr.a_off[k0 + i] == pr.a_off[k0] + i * a_step;
    }
  pr.run = run;
  pr.a_step = a_step;
  pr.b_step = b_step;
  pr.a_even = a_even;
}

// The allocator of the per-thread buffers: 64-byte aligned, like torch's own tensors. A
// std::vector of floats starts 16 bytes into a cache line, so that every vector load of a
// row split across two lines; on an Intel Xeon (AVX-512) that alone cost the micro-kernel
// 10 - 20% of its rate.
template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t line{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), line)); }
  void deallocate(T* p, size_t) { ::operator delete(p, line); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LineAligned<U>&) const { return false; }
};
template <typename T>
using AlignedBuffer = std::vector<T, LineAligned<T>>;

// Writes exact zeros into the output channels of one NCHW sample that are not in `active`.
template <typename scalar_t>
void write_zero_channels(scalar_t* ys, const std::vector<int32_t>& active, int64_t Cout, int64_t P, int64_t syc) {
  size_t next = 0;  // active is increasing: walk it alongside c
  for (int64_t c = 0; c < Cout; ++c) {
    if (next < active.size() && active[next] == c) {
      ++next;
      continue;
    }
    std::fill(ys + c * syc, ys + c * syc + P, scalar_t(0));
  }
}

// The bytes of b that one panel of the micro-kernel reads (conv_gemm.h): a quarter of the
// 2 MiB L2 of an Intel Xeon core, half the 1 MiB of an AMD Zen 4 one. A sample with more (a
// 64-channel 56x56 layer's row-shift buffer is 2.5 MB) was read from L3 once per row block:
// 0.55x of dense execution on that Xeon.
constexpr int64_t L2_PANEL_BYTES = 512 * 1024;

// Everything the kernel needs for one sample, and the per-thread buffers it reuses.
template <typename scalar_t>
struct SampleConv {
  using T = at::opmath_type<scalar_t>;  // float for float16 / bfloat16 / float32; double
  // The op's arguments (shared by all samples).
  const scalar_t* xp;
  int64_t sxn, sxc, sxh, sxw;
  // weight [Cout][Cin][kh][kw] in T, in any layout: the micro-kernel reads it in place through
  // a_row and a_off, so a channels_last weight (model.to(memory_format=torch.channels_last))
  // is not copied on every call
  const T* wp;
  int64_t swo, swi, swh, sww;
  const T *gp, *bp, *tp;  // gate [N][Cout]; bias, shift [Cout] or null
  scalar_t* yp;
  int64_t syn, syc;
  bool nhwc_out;  // y channels_last (adjacent channels)
  int64_t Cin, Cout;
  ConvGeometry g;
  // Per-thread buffers.
  AlignedBuffer<T> planes_buf, b_buf, out_buf;
  std::vector<T> bias_j, scale_j, shift_j;
  std::vector<int64_t> a_row, a_off, b_off, b_off_i, b_off_t, c_row, slot_off;
  std::vector<int32_t> compact_chan;

  // Lays out sample n (active input channels ci, output channels co) and returns its problem.
  cpu_conv::GemmProblem<T> prepare(int64_t n, const std::vector<int32_t>& ci, const std::vector<int32_t>& co) {
    const int64_t kin = static_cast<int64_t>(ci.size()), kout = static_cast<int64_t>(co.size());
    const int64_t taps = g.kh * g.kw, P = g.Ho * g.Wo;
    cpu_conv::GemmProblem<T> pr{};
    pr.rows = kout;
    pr.pixels = P;
    pr.depth = kin * taps;
    pr.a = wp;
    a_row.resize(kout);
    for (int64_t j = 0; j < kout; ++j) a_row[j] = static_cast<int64_t>(co[j]) * swo;
    pr.a_row = a_row.data();

    // The input channels as planes: x itself when its rows are contiguous (NCHW); otherwise
    // (channels_last) the active channels copied once, pixel by pixel, into compact [kin, H, W]
    // planes of T, so that the layouts below read contiguous rows either way.
    const scalar_t* xs = xp + n * sxn;
    b_off_i.resize(kin);
    // Rows of B: a 1x1 conv of dense planes of T reads the planes themselves; stride 1 lays
    // out kw shifted copies of the Hp padded rows per channel; else kh * kw im2col rows of P.
    const bool pointwise = taps == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
    const bool shift_rows = g.sh == 1 && g.sw == 1;
    const int64_t ld = padded_stride<T>(shift_rows ? (g.H + 2 * g.ph) * g.Wo : P);
    // B's offsets into b_buf, laid out by row_shift (or gather_row_shift) or im2col.
    auto buffer_offsets = [&] {
      pr.b = b_buf.data();
      for (int64_t i = 0; i < kin; ++i) b_off_i[i] = i * (shift_rows ? g.kw : taps) * ld;
      b_off_t.resize(taps);
      for (int64_t ky = 0; ky < g.kh; ++ky)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          b_off_t[ky * g.kw + kx] = shift_rows ? kx * ld + ky * g.dh * g.Wo : (ky * g.kw + kx) * ld;
    };
    auto lay_out = [&](const auto& planes) {
      using S = std::remove_cv_t<std::remove_pointer_t<decltype(planes.src)>>;
      if constexpr (std::is_same_v<S, T>) {
        if (pointwise && planes.sy == g.W) {
          pr.b = planes.src;
          for (int64_t i = 0; i < kin; ++i) b_off_i[i] = static_cast<int64_t>(planes.chan[i]) * planes.sc;
          b_off_t.assign(1, 0);
          return;
        }
      }
      b_buf.resize(kin * (shift_rows ? g.kw : taps) * ld);
      if (shift_rows)
        row_shift(planes, kin, g, ld, b_buf.data());
      else
        im2col(planes, kin, g, ld, b_buf.data());
      buffer_offsets();
    };
    if (sxw == 1) {
      lay_out(Planes<scalar_t>{xs, ci.data(), sxc, sxh, 1});
    } else if (std::is_same_v<scalar_t, float> && sxc == 1 && sxh == g.W * sxw && shift_rows && !pointwise &&
               g.Wo == g.W) {
      // channels_last float32, stride 1, "same" width: the row-shift buffer straight from the
      // pixels (no planes in between: one write of the buffer instead of planes written,
      // then read kw times).
      b_buf.resize(kin * g.kw * ld);
      cpu_conv::gather_row_shift(reinterpret_cast<const float*>(xs), sxw, Cin, ci.data(), kin, g.H, g.W, g.kw, g.ph,
                                 g.pw, g.dw, reinterpret_cast<float*>(b_buf.data()), ld);
      buffer_offsets();
    } else {
      const int64_t HW = padded_stride<T>(g.H * g.W);
      planes_buf.resize(kin * HW);
      if (std::is_same_v<scalar_t, float> && sxc == 1 && sxh == g.W * sxw) {
        cpu_conv::gather_planes(reinterpret_cast<const float*>(xs), sxw, Cin, ci.data(), kin, g.H * g.W,
                                reinterpret_cast<float*>(planes_buf.data()), HW);
      } else {
        // Pixel by pixel, so that x is read in order (which the prefetchers follow); the
        // padded plane stride keeps the kin output lines in use from sharing cache sets.
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) {
            const scalar_t* px = xs + h * sxh + w * sxw;
            T* dst = planes_buf.data() + h * g.W + w;
            for (int64_t i = 0; i < kin; ++i) dst[i * HW] = static_cast<T>(px[static_cast<int64_t>(ci[i]) * sxc]);
          }
      }
      compact_chan.resize(kin);
      for (int64_t i = 0; i < kin; ++i) compact_chan[i] = static_cast<int32_t>(i);
      lay_out(Planes<T>{planes_buf.data(), compact_chan.data(), HW, g.W, 1});
    }
    // The (channel, tap) pairs one by one: channel i's weight for tap t = (ky, kx) at
    // ci[i] * swi + ky * swh + kx * sww in its row, its run of pixels at b_off_i[i] + b_off_t[t].
    // A channels_last weight (model.to(memory_format=torch.channels_last)) holds a tap's input
    // channels side by side: there the pairs run tap by tap, so that each weight row is read
    // front to back. Channel by channel, the 9 taps of a 512 -> 512 3x3 weight are 2 KiB apart
    // and the 16 x 512 x 7 x 7 layer ran 2.2x slower than with a contiguous weight (AMD EPYC,
    // Zen 5); a cache line of channels at a time, tap by tap within it, ran 1.0 - 3.7x of it
    // from call to call (the lines of the taps, 2 KiB apart, fall into few cache sets).
    a_off.resize(kin * taps);
    b_off.resize(kin * taps);
    const int64_t tap_stride = g.kw > 1 ? sww : swh;
    const bool taps_outer = taps > 1 && swi < tap_stride;
    for (int64_t i = 0; i < kin; ++i)
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t k = taps_outer ? t * kin + i : i * taps + t;
        a_off[k] = static_cast<int64_t>(ci[i]) * swi + (t / g.kw) * swh + (t % g.kw) * sww;
        b_off[k] = b_off_i[i] + b_off_t[t];
      }
    pr.a_off = a_off.data();
    pr.b_off = b_off.data();
    if (taps_outer || taps == 1) mark_even_runs(pr, kin);
    // Panels of pixels whose rows of b take at most L2_PANEL_BYTES: a row-shift buffer's panel
    // of q pixels reads q + (kh - 1) * dh * Wo values of each of its kin * kw rows, an im2col's
    // (or x's) q of each of its kin * taps rows.
    const int64_t b_rows = kin * (shift_rows ? g.kw : taps);
    const int64_t halo = shift_rows ? (g.kh - 1) * g.dh * g.Wo : 0;
    pr.panel = std::max<int64_t>(1, L2_PANEL_BYTES / static_cast<int64_t>(sizeof(T)) / std::max<int64_t>(1, b_rows) - halo);

    bias_j.resize(kout);
    scale_j.resize(kout);
    shift_j.resize(kout);
    for (int64_t j = 0; j < kout; ++j) {
      const int64_t c = co[j];
      bias_j[j] = bp ? bp[c] : T(0);
      scale_j[j] = gp[n * Cout + c];
      shift_j[j] = tp ? tp[c] : T(0);
    }
    pr.bias = bias_j.data();
    pr.scale = scale_j.data();
    pr.shift = shift_j.data();

    c_row.resize(kout);
    if (writes_y_directly()) {
      pr.c = reinterpret_cast<T*>(yp);
      for (int64_t j = 0; j < kout; ++j) c_row[j] = n * syn + static_cast<int64_t>(co[j]) * syc;
    } else {
      out_buf.resize((kout + 1) * out_stride());  // + a row of zeros for finish()
      pr.c = out_buf.data();
      for (int64_t j = 0; j < kout; ++j) c_row[j] = j * out_stride();
    }
    pr.c_row = c_row.data();
    return pr;
  }

  // The results go into y itself where it holds T (float32, float64) and is NCHW; else
  // into a buffer of rows that finish() writes out (channels_last: transposed into pixels).
  bool writes_y_directly() const { return std::is_same_v<scalar_t, T> && !nhwc_out; }
  int64_t out_stride() const { return padded_stride<T>(g.Ho * g.Wo); }

  // Zeros of the inactive channels of an NCHW y before the kernel runs (channels_last:
  // finish() writes every channel) ...
  void start(int64_t n, const std::vector<int32_t>& co) {
    if (!nhwc_out) write_zero_channels(yp + n * syn, co, Cout, g.Ho * g.Wo, syc);
  }

  // ... and, after it, the buffered results written into y.
  void finish(int64_t n, const std::vector<int32_t>& co) {
    if (writes_y_directly()) return;
    const int64_t kout = static_cast<int64_t>(co.size()), P = g.Ho * g.Wo;
    scalar_t* ys = yp + n * syn;
    if (!nhwc_out) {
      for (int64_t j = 0; j < kout; ++j) {
        scalar_t* dst = ys + static_cast<int64_t>(co[j]) * syc;
        copy_run(dst, out_buf.data() + j * out_stride(), P, 1);
      }
      return;
    }
    // channels_last: pixel by pixel, every channel written once, so the stores run along
    // channels: the active ones from their buffer row, the others from the row of zeros after
    // the last (no branch on the gates, which a random gate would mispredict half the time).
    if (kout == 0) {
      std::fill(ys, ys + P * Cout, scalar_t(0));
      return;
    }
    const int64_t ld = out_stride();
    T* out = out_buf.data();
    std::fill(out + kout * ld, out + kout * ld + P, T(0));
    slot_off.assign(Cout, kout * ld);
    for (int64_t j = 0; j < kout; ++j) slot_off[co[j]] = j * ld;
    const int64_t* off = slot_off.data();
    if constexpr (std::is_same_v<scalar_t, float>) {
      cpu_conv::scatter_planes(out, off, Cout, P, ys, Cout);
      return;
    }
    for (int64_t p = 0; p < P; ++p) {
      scalar_t* dst = ys + p * Cout;
      const T* src = out + p;
      for (int64_t c = 0; c < Cout; ++c) dst[c] = static_cast<scalar_t>(src[off[c]]);
    }
  }
};

// Runs every sample of a conv (SampleConv or PixelRowsConv: start, prepare, finish). Samples
// are the unit of parallel work: each thread takes the next unclaimed sample, so uneven gate
// densities and a core shared with another process do not leave a thread idle behind a static
// split. With fewer samples than threads, one sample after the other, its GEMM rows (output
// channels, or output pixels) split among the threads.
template <typename Conv>
void run_samples(const Conv& proto, int64_t N, const std::vector<std::vector<int32_t>>& in_lists,
                 const std::vector<std::vector<int32_t>>& out_lists) {
  if (N >= at::get_num_threads() || at::in_parallel_region()) {
    std::atomic<int64_t> next_sample{0};
    at::parallel_for(0, N, 1, [&](int64_t, int64_t) {
      Conv conv = proto;
      for (int64_t n = next_sample++; n < N; n = next_sample++) {
        conv.start(n, out_lists[n]);
        if (!out_lists[n].empty()) cpu_conv::run_gemm(conv.prepare(n, in_lists[n], out_lists[n]));
        conv.finish(n, out_lists[n]);
      }
    });
    return;
  }
  Conv conv = proto;
  for (int64_t n = 0; n < N; ++n) {
    conv.start(n, out_lists[n]);
    if (!out_lists[n].empty()) {
      const auto pr = conv.prepare(n, in_lists[n], out_lists[n]);
      at::parallel_for(0, pr.rows, 16, [&](int64_t j0, int64_t j1) {
        auto part = pr;
        part.rows = j1 - j0;
        part.a_row += j0;
        part.c_row += j0;
        if (!pr.per_column) {
          part.bias += j0;
          part.scale += j0;
          part.shift += j0;
        }
        cpu_conv::run_gemm(part);
      });
    }
    conv.finish(n, out_lists[n]);
  }
}

// channels_last float32 input and output: the product with the roles swapped (conv_gemm.h,
// per_column), so that nothing is transposed. The rows are output pixels: their input pixels
// are broadcast from x itself (no padding) or from a zero-padded copy of the sample's active
// input channels, pixel after pixel; the vector lanes run over the sample's active output
// channels, whose weights are gathered once per sample from a [kh][kw][Cin][Cout] copy of the
// weight made once per call (a register compress per 16 channels, AVX2: 8); the results are expanded
// into y's pixels with zeros in the inactive channels (every channel written once), or written
// into y directly where every output channel is active. The other orientation (planes of
// pixels in the lanes) has to transpose the input into planes and the results back.
struct PixelRowsConv {
  const float* xp;
  int64_t sxn, sxw;  // channels_last x: channel stride 1, rows W * sxw apart
  const float* wt;   // weight as [kh][kw][Cin][Cout]
  const float *gp, *bp, *tp;
  float* yp;
  int64_t syn;  // y channels_last with pixel stride Cout
  int64_t Cin, Cout;
  ConvGeometry g;
  AlignedBuffer<float> x_buf, b_buf, c_buf;
  std::vector<float> bias_j, scale_j, shift_j;
  std::vector<int64_t> a_row, a_off, b_off, c_row;
  std::vector<uint16_t> mask, in_mask;  // the active output / input channels, 16 per entry

  int64_t ldb(int64_t kout) const {
    constexpr int64_t L = cpu_conv::kFloatLanes;
    return (kout + L - 1) / L * L;
  }

  // The channels of `active` (of C) as the bit masks compress_row and expand_row take.
  static void set_mask(const std::vector<int32_t>& active, int64_t C, std::vector<uint16_t>& bits) {
    bits.assign((C + 15) / 16, 0);
    for (const int32_t c : active) bits[c / 16] |= static_cast<uint16_t>(1u << (c % 16));
  }

  cpu_conv::GemmProblem<float> prepare(int64_t n, const std::vector<int32_t>& ci, const std::vector<int32_t>& co) {
    const int64_t kin = static_cast<int64_t>(ci.size()), kout = static_cast<int64_t>(co.size());
    const int64_t taps = g.kh * g.kw, P = g.Ho * g.Wo;
    const bool all_in = kin == Cin, all_out = kout == Cout;
    cpu_conv::GemmProblem<float> pr{};
    pr.per_column = true;
    pr.rows = P;
    pr.pixels = kout;
    pr.panel = kout;
    pr.depth = kin * taps;
    // a: x itself without padding (the active channels picked by a_off), else the padded copy.
    const float* xs = xp + n * sxn;
    const bool in_place = g.ph == 0 && g.pw == 0;
    const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
    const int64_t ps = in_place ? sxw : kin;  // pixel stride of a
    if (in_place) {
      pr.a = xs;
    } else {
      x_buf.resize(Hp * Wp * kin + 16);  // + what compress_row may overwrite past the end
      float* xb = x_buf.data();
      if (!all_in) set_mask(ci, Cin, in_mask);
      std::fill(xb, xb + g.ph * Wp * kin, 0.0f);
      for (int64_t h = 0; h < g.H; ++h) {
        float* row = xb + (g.ph + h) * Wp * kin;
        std::fill(row, row + g.pw * kin, 0.0f);
        for (int64_t w = 0; w < g.W; ++w) {
          const float* src = xs + (h * g.W + w) * sxw;
          float* dst = row + (g.pw + w) * kin;
          if (all_in)
            std::copy(src, src + Cin, dst);
          else
            cpu_conv::compress_row(src, in_mask.data(), Cin, dst);
        }
        std::fill(row + (g.pw + g.W) * kin, row + Wp * kin, 0.0f);  // after the pixels: compress_row overwrites
      }
      std::fill(xb + (g.ph + g.H) * Wp * kin, xb + Hp * Wp * kin, 0.0f);
      pr.a = xb;
    }
    a_row.resize(P);
    for (int64_t oh = 0; oh < g.Ho; ++oh)
      for (int64_t ow = 0; ow < g.Wo; ++ow) a_row[oh * g.Wo + ow] = (oh * g.sh * Wp + ow * g.sw) * ps;
    pr.a_row = a_row.data();
    a_off.resize(kin * taps);
    for (int64_t ky = 0; ky < g.kh; ++ky)
      for (int64_t kx = 0; kx < g.kw; ++kx)
        for (int64_t i = 0; i < kin; ++i)
          a_off[(ky * g.kw + kx) * kin + i] = (ky * g.dh * Wp + kx * g.dw) * ps + (in_place ? ci[i] : i);
    pr.a_off = a_off.data();
    // b: the weights of the active (tap, input, output) triples, rows of ldb(kout).
    b_off.resize(kin * taps);
    set_mask(co, Cout, mask);
    if (all_in && all_out) {
      pr.b = wt;
      for (int64_t k = 0; k < kin * taps; ++k) b_off[k] = k * Cout;
    } else {
      const int64_t ld = ldb(kout);
      b_buf.resize(kin * taps * ld + 16);  // + what compress_row may overwrite past the last row
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t i = 0; i < kin; ++i) {
          const int64_t k = t * kin + i;
          cpu_conv::compress_row(wt + (t * Cin + ci[i]) * Cout, mask.data(), Cout, b_buf.data() + k * ld);
          b_off[k] = k * ld;
        }
      pr.b = b_buf.data();
    }
    pr.b_off = b_off.data();
    mark_even_runs(pr, kin);
    bias_j.resize(ldb(kout));
    scale_j.resize(ldb(kout));
    shift_j.resize(ldb(kout));
    for (int64_t j = 0; j < kout; ++j) {
      bias_j[j] = bp ? bp[co[j]] : 0.0f;
      scale_j[j] = gp[n * Cout + co[j]];
      shift_j[j] = tp ? tp[co[j]] : 0.0f;
    }
    pr.bias = bias_j.data();
    pr.scale = scale_j.data();
    pr.shift = shift_j.data();
    // c: y's pixels where every channel is active, else compact rows that finish() expands.
    c_row.resize(P);
    if (all_out) {
      pr.c = yp + n * syn;
      for (int64_t p = 0; p < P; ++p) c_row[p] = p * Cout;
    } else {
      c_buf.resize(P * ldb(kout) + 16);  // + the 16 values expand_row may read past the last row
      pr.c = c_buf.data();
      for (int64_t p = 0; p < P; ++p) c_row[p] = p * ldb(kout);
    }
    pr.c_row = c_row.data();
    return pr;
  }

  void start(int64_t, const std::vector<int32_t>&) {}  // finish() writes every channel

  void finish(int64_t n, const std::vector<int32_t>& co) {
    const int64_t kout = static_cast<int64_t>(co.size()), P = g.Ho * g.Wo;
    if (kout == Cout) return;
    float* ys = yp + n * syn;
    if (kout == 0) {
      std::fill(ys, ys + P * Cout, 0.0f);
      return;
    }
    for (int64_t p = 0; p < P; ++p) cpu_conv::expand_row(c_buf.data() + p * ldb(kout), mask.data(), Cout, ys + p * Cout);
  }
};

// Whether PixelRowsConv runs: float32 channels_last x (channel stride 1, pixels W apart) and
// y, and a layer on which it was measured faster than the other orientation (1 thread, output
// densities 0.25 - 1). With the AVX-512 micro-kernel (AMD EPYC, Zen 5, output density 0.5):
// every strided one (the other needs an im2col: 1.3x at 64 -> 128, 3x3, 16x16 outputs, 2.4x at
// 256 -> 128, 1x1), and 3x3 ones of 512 output pixels and more (28x28: 1.2x, 56x56:
// 1.1 - 1.35x), where packing each sample's weights costs little beside its pixels; on smaller
// outputs (16x16: on par; 8x8 and 7x7 with 256 - 512 channels: 0.7x) and on stride-1 1x1
// layers (0.7 - 0.95x) the other one runs. With the AVX2 one (AMD EPYC, Zen 2; its 6 x 2 tile
// of pixels by channels, conv_gemm.cpp), on layers of 64 output channels or more: strided ones
// of 256 output pixels and more (1.16 - 1.61x; 8x8 outputs 0.93 - 1.0x) and 3x3 ones of 512 and
// more (32x32, 28x28, 56x56: 1.05 - 1.46x; 16x16: 0.89 - 1.07x, 8x8 and 7x7: 0.5 - 0.8x). Fewer
// output channels leave fewer than two of its 8-lane vectors active at low density (16 -> 16
// at 32x32, density 0.25 - 0.5: 0.5 - 0.7x).
// dynkernels.ops._conv_cpu_auto.kernel_lanes_over_channels repeats this test for backend="auto".
bool pixel_rows_apply(const Tensor& x, const Tensor& y, const ConvGeometry& g) {
  const bool layouts = x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.size(1) > 1 &&
                       x.stride(2) == x.size(3) * x.stride(3) && y.stride(1) == 1 && y.size(1) > 1 &&
                       y.stride(3) == y.size(1);
  if (!layouts) return false;
  const bool strided = g.sh > 1 || g.sw > 1;
  const int64_t pixels = g.Ho * g.Wo;
  const std::string_view isa = cpu_conv::gemm_isa();
  if (isa == "avx512") return strided || (g.kh * g.kw > 1 && pixels >= 512);
  if (isa == "avx2") return y.size(1) >= 64 && (strided ? pixels >= 256 : g.kh * g.kw > 1 && pixels >= 512);
  return false;  // the portable kernel has no compress_row / expand_row
}

// The float weight [Cout, Cin, kh, kw] (any strides) as [kh][kw][Cin][Cout], 16 output
// channels at a time: their rows of the weight stay in L2 while every (tap, input channel)
// gets its 16 values, one whole cache line of the copy. weight.permute({2, 3, 1, 0}).contiguous()
// took 1.27 ms for a 256 -> 512 3x3 weight (4.7 MB) on an AMD EPYC (Zen 5, 1 thread), where a
// clone took 0.08 ms: as long as the whole conv of a sample at 7x7. Measured there as the time
// of a call with one active output channel of one sample (stride 2, 14x14 input), mostly this
// copy: 1.41 -> 0.56 ms (0.39 ms from a channels_last weight) at 256 -> 512 and 3.69 -> 1.37 ms at
// 512 -> 512; a batch of one at density 1 ran 1.3 - 1.9x as fast on the strided 128 -> 256,
// 14x14, 256 -> 512 and 512 -> 512, 7x7 layers.
Tensor weight_taps_in_out(const Tensor& weight) {
  const int64_t Cout = weight.size(0), Cin = weight.size(1), kw = weight.size(3), taps = weight.size(2) * kw;
  Tensor wt = at::empty({weight.size(2), kw, Cin, Cout}, weight.options());
  const float* src = weight.const_data_ptr<float>();
  float* dst = wt.mutable_data_ptr<float>();
  const int64_t so = weight.stride(0), si = weight.stride(1);
  std::vector<int64_t> tap_off(taps);
  for (int64_t t = 0; t < taps; ++t) tap_off[t] = (t / kw) * weight.stride(2) + (t % kw) * weight.stride(3);
  constexpr int64_t B = 16;
  at::parallel_for(0, (Cout + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ob = b0; ob < b1; ++ob) {
      const int64_t o0 = ob * B, width = std::min(Cout - o0, B);
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t i = 0; i < Cin; ++i) {
          const float* s = src + o0 * so + i * si + tap_off[t];
          float* d = dst + (t * Cin + i) * Cout + o0;
          for (int64_t o = 0; o < width; ++o) d[o] = s[o * so];
        }
    }
  });
  return wt;
}

void conv_pixel_rows(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& shift,
                     const Tensor& out_gate, const std::vector<std::vector<int32_t>>& in_lists,
                     const std::vector<std::vector<int32_t>>& out_lists, const ConvGeometry& g, Tensor& y) {
  const int64_t N = x.size(0);
  const Tensor wt = weight_taps_in_out(weight);
  const Tensor gate = out_gate.to(at::kFloat).contiguous();
  const Tensor b = bias.defined() ? bias.contiguous() : Tensor();
  const Tensor t = shift.defined() ? shift.contiguous() : Tensor();
  PixelRowsConv proto;
  proto.xp = x.const_data_ptr<float>();
  proto.sxn = x.stride(0);
  proto.sxw = x.stride(3);
  proto.wt = wt.const_data_ptr<float>();
  proto.gp = gate.const_data_ptr<float>();
  proto.bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  proto.tp = t.defined() ? t.const_data_ptr<float>() : nullptr;
  proto.yp = y.mutable_data_ptr<float>();
  proto.syn = y.stride(0);
  proto.Cin = x.size(1);
  proto.Cout = weight.size(0);
  proto.g = g;
  run_samples(proto, N, in_lists, out_lists);
}

// Whether a stride-1 conv copies its weight channels_last first, where the weight's input
// channels are not side by side (a contiguous weight: an NCHW model): then the pairs of the
// micro-kernel run tap by tap over consecutive channels, in even runs (mark_even_runs). Measured
// on an AMD EPYC (Zen 2, AVX2, 1 thread), float32 NCHW x, a channels_last weight against a
// contiguous one: 5 - 20% less time at 128 -> 128, 3x3, 16x16 and 28x28 and 64 -> 64, 56x56;
// the copy (about 10 GB/s) then costs under 1%. It is made where every weight value meets
// 2048 output pixels on average, so that its cost stays small beside the gain: not at 8,
// 256 -> 256, 14x14 or 512 -> 512, 7x7, where the copy took as long as the gain; nor for weights
// under 16384 values, where the copy's fixed cost (a tensor op) was as large. Only with the
// AVX2 micro-kernel: with the AVX-512 one (which walks row blocks outside pixel tiles, and
// loads less per FMA) the copy cost 0.6 - 12% more time on an AMD EPYC (Zen 5, 1 thread, NCHW,
// out and in+out density 0.5; 2026-12-07) at 32, 128 -> 128, 16x16, 8, 128 -> 128, 28x28,
// 8, 64 -> 64, 56x56, 32, 64 -> 64, 32x32 and 8, 512 -> 512, 7x7, and saved 1 - 3% only at
// 8, 256 -> 256, 14x14.
bool copy_weight_channels_last(const Tensor& w, const std::vector<std::vector<int32_t>>& out_lists,
                               const ConvGeometry& g) {
  if (g.kh * g.kw == 1 || g.sh != 1 || g.sw != 1 || w.stride(1) == 1 || w.numel() < 16384) return false;
  if (std::string_view(cpu_conv::gemm_isa()) != "avx2") return false;
  int64_t active = 0;  // output channels computed over all samples
  for (const auto& co : out_lists) active += static_cast<int64_t>(co.size());
  return active * g.Ho * g.Wo >= 2048 * w.size(0);
}

template <typename scalar_t>
void conv_cpu_impl(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& shift, const Tensor& out_gate,
                   const std::vector<std::vector<int32_t>>& in_lists, const std::vector<std::vector<int32_t>>& out_lists,
                   const ConvGeometry& g, Tensor& y) {
  using T = at::opmath_type<scalar_t>;
  constexpr auto kT = c10::CppTypeToScalarType<T>::value;
  const int64_t N = x.size(0);
  Tensor w = weight.to(kT);  // (its own layout: SampleConv reads it through its strides)
  if (copy_weight_channels_last(w, out_lists, g)) w = w.contiguous(at::MemoryFormat::ChannelsLast);
  const Tensor gate = out_gate.to(kT).contiguous();
  const Tensor b = bias.defined() ? bias.to(kT).contiguous() : Tensor();
  const Tensor t = shift.defined() ? shift.to(kT).contiguous() : Tensor();
  SampleConv<scalar_t> proto;
  proto.xp = x.const_data_ptr<scalar_t>();
  proto.sxn = x.stride(0);
  proto.sxc = x.stride(1);
  proto.sxh = x.stride(2);
  proto.sxw = x.stride(3);
  proto.wp = w.const_data_ptr<T>();
  proto.swo = w.stride(0);
  proto.swi = w.stride(1);
  proto.swh = w.stride(2);
  proto.sww = w.stride(3);
  proto.gp = gate.const_data_ptr<T>();
  proto.bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
  proto.tp = t.defined() ? t.const_data_ptr<T>() : nullptr;
  proto.yp = y.mutable_data_ptr<scalar_t>();
  proto.syn = y.stride(0);
  proto.syc = y.stride(1);
  // y has row_layout(x): NCHW (contiguous planes) or channels_last (adjacent channels).
  proto.nhwc_out = y.stride(1) == 1 && weight.size(0) > 1;
  proto.Cin = x.size(1);
  proto.Cout = weight.size(0);
  proto.g = g;
  run_samples(proto, N, in_lists, out_lists);
}

Tensor channel_sparse_conv2d_cpu(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                 const Tensor& out_gate, const std::optional<Tensor>& in_gate, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, const std::optional<Tensor>& shift,
                                 int64_t /*config: the CPU kernel has one configuration*/) {
  const char* op = "channel_sparse_conv2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be [N, Cin, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1), op, ": weight must be [Cout, ", x.size(1),
              ", kh, kw] (groups = 1), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have two entries each");
  const int64_t N = x.size(0), Cout = weight.size(0);
  TORCH_CHECK(out_gate.dim() == 2 && out_gate.size(0) == N && out_gate.size(1) == Cout, op,
              ": out_gate must be [N, Cout] = [", N, ", ", Cout, "], got shape ", out_gate.sizes());
  if (in_gate.has_value())
    TORCH_CHECK(in_gate->dim() == 2 && in_gate->size(0) == N && in_gate->size(1) == x.size(1), op,
                ": in_gate must be [N, Cin] = [", N, ", ", x.size(1), "], got shape ", in_gate->sizes());
  Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == x.scalar_type(), op,
                ": bias must be [Cout] = [", Cout, "] of x's dtype, got ", bias->scalar_type(), " of shape ",
                bias->sizes());
    b = *bias;
  }
  Tensor t;
  if (shift.has_value() && shift->defined()) {
    TORCH_CHECK(shift->dim() == 1 && shift->size(0) == Cout && shift->scalar_type() == x.scalar_type(), op,
                ": shift must be [Cout] = [", Cout, "] of x's dtype, got ", shift->scalar_type(), " of shape ",
                shift->sizes());
    t = *shift;
  }
  ConvGeometry g{x.size(2), x.size(3), weight.size(2), weight.size(3), stride[0], stride[1],
                 padding[0],  padding[1], dilation[0],   dilation[1],  0,         0};
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1 && g.ph >= 0 && g.pw >= 0 && g.dh >= 1 && g.dw >= 1, op,
              ": stride and dilation must be >= 1 and padding >= 0");
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, op, ": the kernel is larger than the padded input");

  // Every element is written by the kernel: the active channels by the GEMM epilogue, the
  // inactive ones with zeros.
  Tensor y = at::empty({N, Cout, g.Ho, g.Wo}, x.options(), row_layout(x));
  if (N == 0 || Cout == 0) return y;
  const auto out_lists = active_lists(out_gate);
  std::vector<std::vector<int32_t>> in_lists;
  if (in_gate.has_value()) {
    in_lists = active_lists(*in_gate);
  } else {
    std::vector<int32_t> all(x.size(1));
    for (int64_t c = 0; c < x.size(1); ++c) all[c] = static_cast<int32_t>(c);
    in_lists.assign(N, all);
  }
  if (pixel_rows_apply(x, y, g)) {
    conv_pixel_rows(x, weight, b, t, out_gate, in_lists, out_lists, g, y);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sparse_conv2d_cpu", [&] {
    conv_cpu_impl<scalar_t>(x, weight, b, t, out_gate, in_lists, out_lists, g, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("channel_sparse_conv2d", &channel_sparse_conv2d_cpu); }

}  // namespace dynkernels
