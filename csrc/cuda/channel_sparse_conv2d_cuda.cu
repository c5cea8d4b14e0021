// CUDA kernel of dynkernels::channel_sparse_conv2d (contract: DESIGN.md; semantics:
// dynkernels/reference.py::channel_sparse_conv2d):
//   y[n, c] = out_gate[n, c] * (conv2d(x * [in_gate > 0], weight)[n, c] + bias[c]) + shift[c]  where out_gate[n, c] > 0,
//   y[n, c] = 0 exactly                                                                     elsewhere.
//
// Steps, all on the current stream, with no host synchronisation:
//  1. compact_channels_kernel (one launch): per sample, the compacted list of active output
//     channels (out_gate > 0, ascending, followed by the inactive ones) and its count; likewise
//     for the input channels when in_gate is given.
//  2. The input as NHWC with a channel stride Kc that is a multiple of 8, so that channel
//     vectors are 16-byte loads. x itself when it already is (channels_last, Cin % 8 == 0,
//     aligned, no in_gate); otherwise gather_nhwc_kernel (any strides) or
//     gather_nhwc_from_channels_last_kernel (channel stride 1) writes a buffer holding, per
//     sample, only the active input channels (compacted to j < count, zeros up to Kc).
//  3. The weight as [Cout, KH, KW, Kc] (zero padded). With an input gate, where a sample has
//     many pixel tiles (compact_weights_per_sample), compact_weight_rows_kernel also writes each
//     sample's weight rows restricted to its active input channels, so that the GEMM reads them
//     with 16-byte loads instead of gathering them in every pixel tile.
//  4. channel_sparse_conv2d_gemm_kernel (channel_sparse_conv2d_gemm.cuh): the implicit GEMM over
//     active output channels x output pixels x (kernel window x active input channels):
//     cp.async pipeline, ldmatrix and mma.sync tensor cores for fp16/bf16 (fp32 accumulation),
//     fp32 FMAs for fp32; the epilogue adds the bias, scales by the gate, adds the shift and
//     writes exact zeros to the inactive channels. `config` picks its tile configuration
//     (channel_sparse_conv2d_tiles.h: kTileConfigs; -1: default_tile_config).
//
// Includes: the stream comes from c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h,
// which pulls in the cuBLAS/cuSPARSE headers that a bare CUDA toolkit may not have.
//
// Output layout: row_layout(x) (csrc/layout.h): channels_last when x is channels_last and not
// also plain contiguous, else contiguous NCHW.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>

#include "../layout.h"
#include "channel_sparse_conv2d_gemm.cuh"

namespace dynkernels {
namespace {

using at::Tensor;
using namespace conv_cuda;

constexpr const char* kOp = "channel_sparse_conv2d";
constexpr int kChannelAlign = 8;  // Kc is a multiple of 8: one 16-byte vector of 16-bit types

// ------------------------------------------------------------------------------ prologues
// One warp per (sample, gate): blockIdx.x is the sample, blockIdx.y selects the output gate (0) or
// the input gate (1; nothing to do without one). A stable partition of gate[n, :] into the
// active channels (gate > 0) in increasing order, then the inactive ones in increasing order,
// like dynkernels.compact. NaN gates are inactive (NaN > 0 is false), as in the reference.
struct GateLists {
  bool present;       // false: no such gate (no input gate given)
  const float* gate;  // [N, C] float32 (may be nullptr when C == 0)
  int C;
  int* list;   // [N, C]
  int* count;  // [N]
};

__global__ void compact_channels_kernel(GateLists out, GateLists in) {
  const GateLists L = blockIdx.y == 0 ? out : in;
  if (!L.present) return;  // block-uniform
  const int n = blockIdx.x;
  const int lane = threadIdx.x;
  const int C = L.C;
  const float* g = L.gate + (int64_t)n * C;
  int* list = L.list + (int64_t)n * C;
  const unsigned below = (1u << lane) - 1u;  // lanes before this one
  int active = 0;
  for (int c0 = 0; c0 < C; c0 += 32) {
    const int c = c0 + lane;
    const bool on = c < C && g[c] > 0.0f;
    const unsigned mask = __ballot_sync(0xffffffffu, on);
    if (on) list[active + __popc(mask & below)] = c;
    active += __popc(mask);
  }
  int next = active;  // inactive channels follow the active ones
  for (int c0 = 0; c0 < C; c0 += 32) {
    const int c = c0 + lane;
    const bool off = c < C && !(g[c] > 0.0f);
    const unsigned mask = __ballot_sync(0xffffffffu, off);
    if (off) list[next + __popc(mask & below)] = c;
    next += __popc(mask);
  }
  if (lane == 0) L.count[n] = active;
}

// xb[n, h, w, j] = x[n, list[j], h, w] for j < count[n], 0 for count[n] <= j < Kc, where list is
// the sample's active input channels (or j itself, count = Cin, without an input gate). x has any
// strides. A 32 (channels) x 32 (pixels) tile goes through shared memory so that both the reads
// (pixels fastest, as in NCHW) and the writes (channels fastest) are coalesced.
// grid: (ceil(H*W / 32), ceil(Kc / 32), N); block: (32, 8).
template <typename Raw>
__global__ void gather_nhwc_kernel(const Raw* __restrict__ x, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                                   int Cin, int H, int W, int Kc, const int* __restrict__ in_list,
                                   const int* __restrict__ in_count, Raw* __restrict__ xb) {
  __shared__ Raw tile[32][33];
  const int n = blockIdx.z;
  const int HW = H * W;
  const int hw0 = blockIdx.x * 32, j0 = blockIdx.y * 32;
  const int ca = in_count ? in_count[n] : Cin;
  {
    const int hw = hw0 + threadIdx.x;
    const int h = hw / W, w = hw - (hw / W) * W;
    for (int jy = threadIdx.y; jy < 32; jy += 8) {
      const int j = j0 + jy;
      Raw v = Raw(0);
      if (hw < HW && j < ca) {
        const int c = in_list ? in_list[(int64_t)n * Cin + j] : j;
        v = x[n * sn + c * sc + h * sh + w * sw];
      }
      tile[jy][threadIdx.x] = v;
    }
  }
  __syncthreads();
  const int j = j0 + threadIdx.x;
  for (int py = threadIdx.y; py < 32; py += 8) {
    const int hw = hw0 + py;
    if (hw < HW && j < Kc) xb[((int64_t)n * HW + hw) * Kc + j] = tile[threadIdx.x][py];
  }
}

// The same for x whose channels are contiguous (channels_last; strides sn, sh, sw): one warp per
// pixel with its lanes along the channels, so that the reads stay within the pixel's channel
// vector and the writes are contiguous. grid: (ceil(H*W / 8), N); block: 256 (8 warps).
template <typename Raw>
__global__ void gather_nhwc_from_channels_last_kernel(const Raw* __restrict__ x, int64_t sn, int64_t sh, int64_t sw,
                                                      int Cin, int H, int W, int Kc, const int* __restrict__ in_list,
                                                      const int* __restrict__ in_count, Raw* __restrict__ xb) {
  const int n = blockIdx.y;
  const int hw = blockIdx.x * 8 + (threadIdx.x >> 5);
  if (hw >= H * W) return;
  const int h = hw / W, w = hw - (hw / W) * W;
  const Raw* src = x + n * sn + h * sh + w * sw;
  Raw* dst = xb + ((int64_t)n * H * W + hw) * Kc;
  const int ca = in_count ? in_count[n] : Cin;
  const int* list = in_list ? in_list + (int64_t)n * Cin : nullptr;
  for (int j = threadIdx.x & 31; j < Kc; j += 32) dst[j] = j < ca ? src[list ? list[j] : j] : Raw(0);
}

// wc[n, m, rs, j] = wt[out_list[n, m], rs, in_list[n, j]] for j < in_count[n], 0 for
// in_count[n] <= j < Kc: sample n's weight rows (active output channels m < out_count[n], in
// their compacted order) restricted to its active input channels, k-contiguous. Rows past the
// active count are not written (the GEMM never reads them). grid: (Cout, N); block: 128; one
// 16-byte vector of consecutive j per thread and step.
template <typename Raw>
__global__ void compact_weight_rows_kernel(const Raw* __restrict__ wt, int taps, int Kc, int Cin, int Cout,
                                           const int* __restrict__ out_list, const int* __restrict__ out_count,
                                           const int* __restrict__ in_list, const int* __restrict__ in_count,
                                           Raw* __restrict__ wc) {
  constexpr int VEC = 16 / sizeof(Raw);
  const int n = blockIdx.y, m = blockIdx.x;
  if (m >= out_count[n]) return;
  const int ca = in_count[n];
  const int* list = in_list + (int64_t)n * Cin;
  const Raw* src = wt + (int64_t)out_list[(int64_t)n * Cout + m] * taps * Kc;
  uint4* dst = reinterpret_cast<uint4*>(wc + ((int64_t)n * Cout + m) * taps * Kc);
  for (int v = threadIdx.x; v < taps * Kc / VEC; v += blockDim.x) {
    const int rs = v * VEC / Kc, j0 = v * VEC - rs * Kc;
    union {
      uint4 u;
      Raw r[VEC];
    } out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) out.r[i] = j0 + i < ca ? src[rs * Kc + list[j0 + i]] : Raw(0);
    dst[v] = out.u;
  }
}

// ------------------------------------------------------------------------------ host side
int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

void check_gate(const char* name, const Tensor& gate, const Tensor& x, int64_t N, int64_t C, const char* shape) {
  TORCH_CHECK(gate.dim() == 2 && gate.size(0) == N && gate.size(1) == C, kOp, ": ", name, " must be ", shape,
              " = [", N, ", ", C, "], got shape ", gate.sizes());
  TORCH_CHECK(at::isFloatingType(gate.scalar_type()) || gate.scalar_type() == at::kBool, kOp, ": ", name,
              " must be a floating or bool tensor, got ", gate.scalar_type());
  TORCH_CHECK(gate.device() == x.device(), kOp, ": ", name, " is on ", gate.device(), " but x is on ", x.device(),
              "; they must be on one device");
}

std::pair<int64_t, int64_t> pair_arg(const char* name, at::IntArrayRef v, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, kOp, ": ", name, " must have 2 entries, got ", v);
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, kOp, ": ", name, " must be >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

// One kernel instantiation. Dynamic shared memory above 48 KiB needs an opt-in per kernel and
// device, made on its first launch there.
template <typename T, typename Compute, bool GatherK>
void launch_kernel(const Params& P, int device, cudaStream_t stream) {
  using L = Layout<T, Compute>;
  auto* kernel = &channel_sparse_conv2d_gemm_kernel<T, Compute, GatherK>;
  if constexpr (L::SMEM > 48 * 1024) {
    static std::atomic<uint64_t> opted_in{0};  // bit d: done on device d (< 64)
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (bit == 0 || !(opted_in.load(std::memory_order_relaxed) & bit)) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::SMEM));
      opted_in.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const dim3 grid((P.Ho * P.Wo + L::BN - 1) / L::BN, (P.Cout + L::BM - 1) / L::BM, P.N);
  kernel<<<grid, L::THREADS, L::SMEM, stream>>>(P);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, bool GatherK, int... Config>
void launch_tensor_core(int config, const Params& P, int device, cudaStream_t stream,
                        std::integer_sequence<int, Config...>) {
  ((config == Config ? launch_kernel<T, MmaCompute<T, Config>, GatherK>(P, device, stream) : void()), ...);
}

// config: an index into kTileConfigs (checked by the caller); fp32 has one configuration.
template <typename T>
void launch_gemm(int config, const Params& P, int device, cudaStream_t stream) {
  const bool gather_k = P.in_list != nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (gather_k)
      launch_kernel<float, FmaCompute, true>(P, device, stream);
    else
      launch_kernel<float, FmaCompute, false>(P, device, stream);
  } else {
    constexpr auto configs = std::make_integer_sequence<int, kNumTileConfigs>{};
    if (gather_k)
      launch_tensor_core<T, true>(config, P, device, stream, configs);
    else
      launch_tensor_core<T, false>(config, P, device, stream, configs);
  }
}

template <typename Raw>
void launch_gather(const Tensor& x, int Kc, const int* in_list, const int* in_count, Tensor& xb,
                   cudaStream_t stream) {
  const int N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const Raw* src = static_cast<const Raw*>(x.const_data_ptr());
  Raw* dst = static_cast<Raw*>(xb.mutable_data_ptr());
  if (x.stride(1) == 1) {
    gather_nhwc_from_channels_last_kernel<Raw><<<dim3((H * W + 7) / 8, N), 256, 0, stream>>>(
        src, x.stride(0), x.stride(2), x.stride(3), Cin, H, W, Kc, in_list, in_count, dst);
  } else {
    const dim3 grid((H * W + 31) / 32, (Kc + 31) / 32, N);
    gather_nhwc_kernel<Raw><<<grid, dim3(32, 8), 0, stream>>>(src, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
                                                              Cin, H, W, Kc, in_list, in_count, dst);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor channel_sparse_conv2d_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                  const Tensor& out_gate, const std::optional<Tensor>& in_gate,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  const std::optional<Tensor>& shift, int64_t config) {
  // ---- arguments
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be [N, Cin, H, W], got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), kOp, ": the CUDA kernel needs x on a CUDA device, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": the CUDA kernel supports x of dtype float32, float16 or bfloat16, got ", dtype,
              (dtype == at::kDouble ? " (use backend='torch' for float64)" : ""));
  TORCH_CHECK(weight.dim() == 4, kOp, ": weight must be [Cout, Cin, kh, kw], got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == dtype, kOp, ": weight must have x's dtype ", dtype, ", got ",
              weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), kOp, ": weight is on ", weight.device(), " but x is on ", x.device(),
              "; they must be on one device");
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  TORCH_CHECK(weight.size(1) == Cin, kOp, ": weight has ", weight.size(1), " input channels but x has ", Cin,
              " (groups > 1 is not supported)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout, kOp, ": bias must be [Cout] = [", Cout,
                "], got shape ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, kOp, ": bias must have x's dtype ", dtype, ", got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), kOp, ": bias is on ", bias->device(), " but x is on ", x.device(),
                "; they must be on one device");
  }
  if (shift.has_value()) {
    TORCH_CHECK(shift->dim() == 1 && shift->size(0) == Cout, kOp, ": shift must be [Cout] = [", Cout,
                "], got shape ", shift->sizes());
    TORCH_CHECK(shift->scalar_type() == dtype, kOp, ": shift must have x's dtype ", dtype, ", got ",
                shift->scalar_type());
    TORCH_CHECK(shift->device() == x.device(), kOp, ": shift is on ", shift->device(), " but x is on ", x.device(),
                "; they must be on one device");
  }
  check_gate("out_gate", out_gate, x, N, Cout, "[N, Cout]");
  if (in_gate.has_value()) check_gate("in_gate", *in_gate, x, N, Cin, "[N, Cin]");
  const auto [sh, sw] = pair_arg("stride", stride, 1);
  const auto [ph, pw] = pair_arg("padding", padding, 0);
  const auto [dh, dw] = pair_arg("dilation", dilation, 1);
  TORCH_CHECK(config >= -1 && config < kNumTileConfigs, kOp, ": config must be -1 (the kernel's own choice) or a ",
              "tile configuration id in [0, ", kNumTileConfigs, "), got ", config);
  const int64_t extent_h = H + 2 * ph - dh * (KH - 1), extent_w = W + 2 * pw - dw * (KW - 1);
  TORCH_CHECK(extent_h >= 1 && extent_w >= 1, kOp, ": the kernel (", KH, "x", KW, ", dilation ", dilation,
              ") is larger than the padded input (", H, "x", W, ", padding ", padding, ")");
  const int64_t Ho = (extent_h - 1) / sh + 1, Wo = (extent_w - 1) / sw + 1;
  const int64_t Cpad = round_up(Cin, kChannelAlign);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(N <= 65535, kOp, ": the CUDA kernel supports at most 65535 samples, got ", N);
  TORCH_CHECK(Cout <= 65535 * 64, kOp, ": the CUDA kernel supports at most ", 65535 * 64, " output channels, got ", Cout);
  TORCH_CHECK(Cout <= kIntMax && Cpad <= kIntMax && H * W <= kIntMax && Ho * Wo <= kIntMax &&
                  KH * KW <= kIntMax && H + 2 * ph <= kIntMax && W + 2 * pw <= kIntMax,
              kOp, ": sizes past 2^31 - 1 are not supported");
  // The GEMM kernel's element offsets within one sample's padded input and within the weight are int32.
  TORCH_CHECK((H + 2 * ph) * (W + 2 * pw) * Cpad <= kIntMax && Cout * KH * KW * Cpad <= kIntMax, kOp,
              ": the CUDA kernel needs (H + 2 padding) * (W + 2 padding) * Cin and Cout * kh * kw * Cin (Cin rounded ",
              "up to a multiple of 8) below 2^31, got x of shape ", x.sizes(), ", padding ", padding,
              " and weight of shape ", weight.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto fmt = row_layout(x);
  Tensor y = at::empty({N, Cout, Ho, Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;

  // ---- 1. channel lists (one launch for both gates)
  const auto int_opts = x.options().dtype(at::kInt);
  const Tensor og = out_gate.to(at::kFloat).contiguous();
  const Tensor out_list = at::empty({N, Cout}, int_opts), out_count = at::empty({N}, int_opts);
  Tensor ig, in_list, in_count;
  if (in_gate.has_value()) {
    ig = in_gate->to(at::kFloat).contiguous();
    in_list = at::empty({N, Cin}, int_opts);
    in_count = at::empty({N}, int_opts);
  }
  const GateLists out_lists{true, og.const_data_ptr<float>(), static_cast<int>(Cout), out_list.mutable_data_ptr<int>(),
                            out_count.mutable_data_ptr<int>()};
  const GateLists in_lists = in_gate.has_value()
                                 ? GateLists{true, ig.const_data_ptr<float>(), static_cast<int>(Cin),
                                             in_list.mutable_data_ptr<int>(), in_count.mutable_data_ptr<int>()}
                                 : GateLists{false, nullptr, 0, nullptr, nullptr};
  compact_channels_kernel<<<dim3(N, 2), 32, 0, stream>>>(out_lists, in_lists);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int* in_list_p = in_gate.has_value() ? in_list.const_data_ptr<int>() : nullptr;
  const int* in_count_p = in_gate.has_value() ? in_count.const_data_ptr<int>() : nullptr;

  // ---- 2. NHWC input with 16-byte channel vectors
  Tensor xb;
  const bool direct = !in_gate.has_value() && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                      Cin % kChannelAlign == 0 && aligned16(x);
  if (direct) {
    xb = x;
  } else {
    xb = at::empty({N, H, W, Cpad}, x.options());
    if (xb.numel() > 0) {
      if (dtype == at::kFloat)
        launch_gather<uint32_t>(x, Cpad, in_list_p, in_count_p, xb, stream);
      else
        launch_gather<uint16_t>(x, Cpad, in_list_p, in_count_p, xb, stream);
    }
  }

  // ---- 3. weight as [Cout, KH, KW, Kc]
  const Tensor w_khwc = weight.permute({0, 2, 3, 1});
  Tensor wt;
  if (Cpad == Cin) {
    wt = w_khwc.contiguous();
    if (!aligned16(wt)) wt = wt.clone();
  } else {
    wt = at::zeros({Cout, KH, KW, Cpad}, weight.options());
    wt.narrow(3, 0, Cin).copy_(w_khwc);
  }

  // ---- 4. implicit GEMM
  Tensor b = bias.has_value() ? bias->contiguous() : Tensor();
  Tensor t = shift.has_value() ? shift->contiguous() : Tensor();
  Params P{};
  P.xb = xb.const_data_ptr();
  P.wt = wt.const_data_ptr();
  P.bias = b.defined() ? b.const_data_ptr() : nullptr;
  P.shift = t.defined() ? t.const_data_ptr() : nullptr;
  P.out_gate = og.const_data_ptr<float>();
  P.out_list = out_list.const_data_ptr<int>();
  P.out_count = out_count.const_data_ptr<int>();
  P.in_list = in_list_p;
  P.in_count = in_count_p;
  P.y = y.mutable_data_ptr();
  P.N = N; P.Cin = Cin; P.H = H; P.W = W; P.Kc = Cpad; P.Cout = Cout; P.KH = KH; P.KW = KW;
  P.Ho = Ho; P.Wo = Wo;
  P.stride_h = sh; P.stride_w = sw; P.pad_h = ph; P.pad_w = pw; P.dil_h = dh; P.dil_w = dw;
  P.y_sn = y.stride(0); P.y_sc = y.stride(1); P.y_sp = y.stride(3);
  P.pixel_major = fmt == at::MemoryFormat::ChannelsLast;
  const int cfg = config >= 0 ? static_cast<int>(config) : default_tile_config(Cout, Ho * Wo);
  const int bn = dtype == at::kFloat ? kFmaTileConfig.bn : kTileConfigs[cfg].bn;
  Tensor wc;
  if (in_gate.has_value() && compact_weights_per_sample(Ho * Wo, bn, N * Cout * KH * KW * Cpad)) {
    wc = at::empty({N, Cout, KH * KW, Cpad}, weight.options());
    const dim3 grid(Cout, N);
    if (dtype == at::kFloat)
      compact_weight_rows_kernel<uint32_t><<<grid, 128, 0, stream>>>(
          static_cast<const uint32_t*>(P.wt), KH * KW, Cpad, Cin, Cout, P.out_list, P.out_count, in_list_p, in_count_p,
          static_cast<uint32_t*>(wc.mutable_data_ptr()));
    else
      compact_weight_rows_kernel<uint16_t><<<grid, 128, 0, stream>>>(
          static_cast<const uint16_t*>(P.wt), KH * KW, Cpad, Cin, Cout, P.out_list, P.out_count, in_list_p, in_count_p,
          static_cast<uint16_t*>(wc.mutable_data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    P.wt = wc.const_data_ptr();
    P.w_sample_stride = Cout * KH * KW * Cpad;
    P.in_list = nullptr;  // the GEMM reads the compacted rows like an ungated weight (in_count: its K extent)
  }
  const int device = x.device().index();
  switch (dtype) {
    case at::kFloat: launch_gemm<float>(cfg, P, device, stream); break;
    case at::kHalf: launch_gemm<c10::Half>(cfg, P, device, stream); break;
    default: launch_gemm<c10::BFloat16>(cfg, P, device, stream); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("channel_sparse_conv2d", &channel_sparse_conv2d_cuda); }

}  // namespace dynkernels
