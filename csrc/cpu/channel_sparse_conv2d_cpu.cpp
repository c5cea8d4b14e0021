// CPU kernel for channel_sparse_conv2d (contract: DESIGN.md).
//
// Per sample n: list its active input channels (in_gate > 0, all when there is no in_gate)
// and active output channels (out_gate > 0); gather the weights of the active (output,
// input) channel pairs; multiply them with only the active input channels (stride 1: kh
// GEMMs over a buffer of horizontally shifted input rows, see conv_cpu_impl; other strides:
// im2col of the active channels, then one GEMM); then add the bias, scale by the gate and add
// the shift while writing the active output channels. Inactive output channels are written as exact
// zeros. FLOPs: kout * kin * kh * kw * Ho * Wo per sample.
// Samples run in parallel (claimed one by one by the threads of at::parallel_for), each GEMM
// single-threaded inside its task.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <vector>

#include "../layout.h"

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

// cols[(i*kh + ky)*kw + kx, (oh - oh0)*Wo + ow] = x[ci[i], oh*sh - ph + ky*dh, ow*sw - pw + kx*dw]
// (0 outside the input) for the output rows oh0 <= oh < oh1. xs: the sample's base pointer;
// sc/sy/sx: x's channel/row/column strides (any layout).
template <typename scalar_t>
void im2col_active(const scalar_t* xs, int64_t sc, int64_t sy, int64_t sx, const std::vector<int32_t>& ci,
                   const ConvGeometry& g, int64_t oh0, int64_t oh1, scalar_t* cols) {
  const int64_t P = (oh1 - oh0) * g.Wo;
  for (size_t i = 0; i < ci.size(); ++i) {
    const scalar_t* xc = xs + static_cast<int64_t>(ci[i]) * sc;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      int64_t oh_lo, oh_hi;
      valid_range(g.H, g.Ho, g.sh, g.ph, ky * g.dh, oh_lo, oh_hi);
      oh_lo = std::clamp(oh_lo, oh0, oh1);
      oh_hi = std::clamp(oh_hi, oh_lo, oh1);
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        int64_t ow_lo, ow_hi;
        valid_range(g.W, g.Wo, g.sw, g.pw, kx * g.dw, ow_lo, ow_hi);
        scalar_t* row = cols + ((static_cast<int64_t>(i) * g.kh + ky) * g.kw + kx) * P - oh0 * g.Wo;
        std::fill(row + oh0 * g.Wo, row + oh_lo * g.Wo, scalar_t(0));
        for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
          scalar_t* dst = row + oh * g.Wo;
          const scalar_t* src = xc + (oh * g.sh - g.ph + ky * g.dh) * sy + (kx * g.dw - g.pw) * sx;
          std::fill(dst, dst + ow_lo, scalar_t(0));
          if (g.sw * sx == 1) {
            std::memcpy(dst + ow_lo, src + ow_lo, (ow_hi - ow_lo) * sizeof(scalar_t));
          } else {
            const int64_t step = g.sw * sx;
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) dst[ow] = src[ow * step];
          }
          std::fill(dst + ow_hi, dst + g.Wo, scalar_t(0));
        }
        std::fill(row + oh_hi * g.Wo, row + oh1 * g.Wo, scalar_t(0));
      }
    }
  }
}

// Writes exact zeros into the output channels of one sample that are not in `active`.
template <typename scalar_t>
void write_zero_channels(scalar_t* ys, const std::vector<int32_t>& active, int64_t Cout, const ConvGeometry& g,
                         int64_t syc, int64_t syh, int64_t syw) {
  size_t next = 0;  // active is increasing: walk it alongside c
  for (int64_t c = 0; c < Cout; ++c) {
    if (next < active.size() && active[next] == c) {
      ++next;
      continue;
    }
    scalar_t* dst = ys + c * syc;
    if (syw == 1 && syh == g.Wo) {
      std::fill(dst, dst + g.Ho * g.Wo, scalar_t(0));
    } else {
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow) dst[oh * syh + ow * syw] = scalar_t(0);
    }
  }
}

template <typename scalar_t>
void conv_cpu_impl(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& shift, const Tensor& out_gate,
                   const std::vector<std::vector<int32_t>>& in_lists, const std::vector<std::vector<int32_t>>& out_lists,
                   const ConvGeometry& g, Tensor& y) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t N = x.size(0), Cin = x.size(1), Cout = weight.size(0);
  const int64_t taps = g.kh * g.kw;
  const Tensor w = weight.contiguous();
  const Tensor gate = out_gate.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
  const Tensor b = bias.defined() ? bias.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous() : Tensor();
  const Tensor t = shift.defined() ? shift.to(c10::CppTypeToScalarType<opmath_t>::value).contiguous() : Tensor();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const opmath_t* gp = gate.const_data_ptr<opmath_t>();
  const opmath_t* bp = b.defined() ? b.const_data_ptr<opmath_t>() : nullptr;
  const opmath_t* tp = t.defined() ? t.const_data_ptr<opmath_t>() : nullptr;
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t sxn = x.stride(0), sxc = x.stride(1), sxh = x.stride(2), sxw = x.stride(3);
  const int64_t syn = y.stride(0), syc = y.stride(1), syh = y.stride(2), syw = y.stride(3);
  const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  // Stride 1: kh accumulating GEMMs over a "row-shift" buffer instead of a full im2col.
  // rows [kw * kin, Hp * Wo] holds, for each horizontal tap kx and active input channel i,
  // the zero-padded input rows (Hp = H + 2*ph of them) already shifted by kx*dw - pw, one
  // output-width row each. For the vertical tap ky, every output pixel (oh, ow) then reads
  // rows[:, (oh + ky*dh) * Wo + ow]: one contiguous window of Ho*Wo columns starting at
  // ky*dh*Wo, so the conv is kh GEMMs [kout, kw*kin] @ window, with no wasted columns and
  // kw times less buffer than an im2col. Other strides: im2col + one GEMM.
  const bool row_shift = g.sh == 1 && g.sw == 1;
  const int64_t Hp = g.H + 2 * g.ph;
  const Tensor w_taps = row_shift ? weight.permute({2, 3, 0, 1}).contiguous() : Tensor();  // [kh, kw, Cout, Cin]
  const scalar_t* wtp = row_shift ? w_taps.const_data_ptr<scalar_t>() : nullptr;

  // Samples are the unit of parallel work (the nested GEMMs run single-threaded). Each
  // thread takes the next unclaimed sample, so uneven gate densities and a core shared with
  // another process do not leave a thread idle behind a static split.
  const bool nhwc_out = syc == 1 && Cout > 1;  // channels_last y (row_layout of a channels_last x)
  std::atomic<int64_t> next_sample{0};
  at::parallel_for(0, N, 1, [&](int64_t, int64_t) {
    std::vector<scalar_t> in_buf, wg_buf, out_buf, chw_buf;
    std::vector<int32_t> all_compact, slot;
    for (int64_t n = next_sample++; n < N; n = next_sample++) {
      const auto& co = out_lists[n];
      const int64_t kout = static_cast<int64_t>(co.size());
      if (!nhwc_out) write_zero_channels(yp + n * syn, co, Cout, g, syc, syh, syw);
      if (kout == 0 && !nhwc_out) continue;
      const auto& ci = in_lists[n];  // active input channels: index the weight (and x, for NCHW)
      const int64_t kin = static_cast<int64_t>(ci.size());
      // The sample's input: x itself when its rows are contiguous (NCHW); otherwise (e.g.
      // channels_last) its active channels copied once, pixel by pixel, into a compact
      // [kin, H, W] buffer, so the loops below read contiguous rows either way.
      const scalar_t* xs = xp + n * sxn;
      const std::vector<int32_t>* cx_ptr = &ci;  // the same channels' positions in xs
      int64_t csc = sxc, csh = sxh, csw = sxw;
      if (sxw != 1 && kin > 0 && kout > 0) {
        const int64_t HW = g.H * g.W;
        chw_buf.resize(kin * HW);
        for (int64_t h = 0; h < g.H; ++h)
          for (int64_t w = 0; w < g.W; ++w) {
            const scalar_t* px = xs + h * sxh + w * sxw;
            scalar_t* dst = chw_buf.data() + h * g.W + w;
            for (int64_t i = 0; i < kin; ++i) dst[i * HW] = px[static_cast<int64_t>(ci[i]) * sxc];
          }
        all_compact.resize(kin);
        std::iota(all_compact.begin(), all_compact.end(), 0);  // the buffer holds exactly the active channels
        xs = chw_buf.data();
        cx_ptr = &all_compact;
        csc = HW;
        csh = g.W;
        csw = 1;
      }
      const auto& cx = *cx_ptr;
      const int64_t P = g.Ho * g.Wo;
      out_buf.resize(kout * P);
      scalar_t* out = out_buf.data();
      if (kout == 0) {
        // nothing to compute: the channels_last epilogue below writes the zeros
      } else if (kin == 0) {
        std::fill(out, out + kout * P, scalar_t(0));
      } else if (row_shift) {
        const int64_t K = g.kw * kin;
        const int64_t plane = Hp * g.Wo;
        in_buf.resize(K * plane);
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          int64_t ow_lo, ow_hi;  // output columns whose input column ow + kx*dw - pw is inside
          valid_range(g.W, g.Wo, 1, g.pw, kx * g.dw, ow_lo, ow_hi);
          const int64_t shift = kx * g.dw - g.pw;
          for (int64_t i = 0; i < kin; ++i) {
            const scalar_t* src = xs + static_cast<int64_t>(cx[i]) * csc;
            scalar_t* dst = in_buf.data() + (kx * kin + i) * plane;
            std::fill(dst, dst + g.ph * g.Wo, scalar_t(0));
            std::fill(dst + (g.ph + g.H) * g.Wo, dst + plane, scalar_t(0));
            for (int64_t h = 0; h < g.H; ++h) {
              scalar_t* drow = dst + (g.ph + h) * g.Wo;
              const scalar_t* srow = src + h * csh + shift * csw;
              std::fill(drow, drow + ow_lo, scalar_t(0));
              if (csw == 1) {
                std::memcpy(drow + ow_lo, srow + ow_lo, (ow_hi - ow_lo) * sizeof(scalar_t));
              } else {
                for (int64_t ow = ow_lo; ow < ow_hi; ++ow) drow[ow] = srow[ow * csw];
              }
              std::fill(drow + ow_hi, drow + g.Wo, scalar_t(0));
            }
          }
        }
        // Per vertical tap ky: wg [kout, kw*kin], wg[j, kx*kin + i] = weight[co[j], ci[i], ky, kx],
        // gathered from w_taps (rows are contiguous runs of input channels) just before its GEMM.
        wg_buf.resize(kout * K);
        Tensor out_t = at::from_blob(out, {kout, P}, opts);
        Tensor rows_t = at::from_blob(in_buf.data(), {K, plane}, opts);
        Tensor wg_t = at::from_blob(wg_buf.data(), {kout, K}, opts);
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          for (int64_t j = 0; j < kout; ++j) {
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const scalar_t* wsrc = wtp + ((ky * g.kw + kx) * Cout + co[j]) * Cin;
              scalar_t* dst = wg_buf.data() + j * K + kx * kin;
              if (kin == Cin) {
                std::memcpy(dst, wsrc, Cin * sizeof(scalar_t));
              } else {
                for (int64_t i = 0; i < kin; ++i) dst[i] = wsrc[ci[i]];
              }
            }
          }
          Tensor window = rows_t.narrow(1, ky * g.dh * g.Wo, P);
          if (ky == 0)
            at::mm_out(out_t, wg_t, window);
          else
            out_t.addmm_(wg_t, window);
        }
      } else {
        // cols [kin*taps, Ho*Wo] and wg [kout, kin*taps]: one GEMM.
        const int64_t K = kin * taps;
        in_buf.resize(K * P);
        im2col_active(xs, csc, csh, csw, cx, g, 0, g.Ho, in_buf.data());
        wg_buf.resize(kout * K);
        for (int64_t j = 0; j < kout; ++j) {
          const scalar_t* wrow = wp + static_cast<int64_t>(co[j]) * Cin * taps;
          scalar_t* dst = wg_buf.data() + j * K;
          for (int64_t i = 0; i < kin; ++i)
            std::memcpy(dst + i * taps, wrow + static_cast<int64_t>(ci[i]) * taps, taps * sizeof(scalar_t));
        }
        Tensor out_t = at::from_blob(out, {kout, P}, opts);
        at::mm_out(out_t, at::from_blob(wg_buf.data(), {kout, K}, opts), at::from_blob(in_buf.data(), {K, P}, opts));
      }
      if (nhwc_out) {
        // channels_last output: pixel by pixel, every channel written once (active ones with
        // bias, gate scale and shift, the others with zeros), so the stores run along channels.
        slot.assign(Cout, -1);
        for (int64_t j = 0; j < kout; ++j) slot[co[j]] = static_cast<int32_t>(j);
        const opmath_t* gn = gp + n * Cout;
        for (int64_t oh = 0; oh < g.Ho; ++oh)
          for (int64_t ow = 0; ow < g.Wo; ++ow) {
            const int64_t p = oh * g.Wo + ow;
            scalar_t* dst = yp + n * syn + oh * syh + ow * syw;
            for (int64_t c = 0; c < Cout; ++c) {
              const int32_t j = slot[c];
              dst[c] = j < 0 ? scalar_t(0)
                             : static_cast<scalar_t>((static_cast<opmath_t>(out[j * P + p]) + (bp ? bp[c] : opmath_t(0))) * gn[c] +
                                                     (tp ? tp[c] : opmath_t(0)));
            }
          }
        continue;
      }
      // Epilogue: bias, gate scale and shift, written into the sample's active output channels.
      for (int64_t j = 0; j < kout; ++j) {
        const int64_t c = co[j];
        const opmath_t s = gp[n * Cout + c];
        const opmath_t bc = bp ? bp[c] : opmath_t(0);
        const opmath_t tc = tp ? tp[c] : opmath_t(0);
        const scalar_t* src = out + j * P;
        scalar_t* dst = yp + n * syn + c * syc;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
          const scalar_t* srow = src + oh * g.Wo;
          scalar_t* drow = dst + oh * syh;
          if (syw == 1) {  // NCHW: unit stride, so the compiler vectorises this loop
            for (int64_t ow = 0; ow < g.Wo; ++ow)
              drow[ow] = static_cast<scalar_t>((static_cast<opmath_t>(srow[ow]) + bc) * s + tc);
          } else {
            for (int64_t ow = 0; ow < g.Wo; ++ow)
              drow[ow * syw] = static_cast<scalar_t>((static_cast<opmath_t>(srow[ow]) + bc) * s + tc);
          }
        }
      }
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_sparse_conv2d_cpu", [&] {
    conv_cpu_impl<scalar_t>(x, weight, b, t, out_gate, in_lists, out_lists, g, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("channel_sparse_conv2d", &channel_sparse_conv2d_cpu); }

}  // namespace dynkernels
