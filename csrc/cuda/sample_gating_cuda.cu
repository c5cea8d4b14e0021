// CUDA kernels for compact, gather_rows, scatter_add_rows, scatter_rows and scatter_rows_ (contract:
// DESIGN.md), with the semantics, checks and output layouts of csrc/cpu/sample_gating_cpu.cpp.
//
// No host synchronisation: count is read by the kernels themselves, so gather and scatter
// launch for every row they might touch (capacity rows, N rows) and the rows past count do
// the cheap part of the work (write zeros, copy base). An idx entry that is out of range is
// skipped (gather writes a zero row; scatter_rows leaves that output row unwritten, scatter_rows_
// that row of base untouched); it never causes an out-of-bounds access. idx has M entries
// (M = N for compact's idx); count is clamped to M as well.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "../sample_gating_common.h"

namespace dynkernels {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// count clamped to [0, limit], read on the device.
__device__ __forceinline__ int64_t device_count(const int32_t* count, int64_t limit) {
  const int64_t c = __ldg(count);
  return c < 0 ? 0 : (c > limit ? limit : c);
}

// ----------------------------------------------------------------------------- compact
// One block per gate row. Pass 1 counts the active entries (the start of the inactive group);
// pass 2 walks the row in tiles of kScanThreads * kScanItems entries, each thread owning
// kScanItems consecutive ones, and a block-wide exclusive scan of the per-thread active counts
// gives every entry its rank: active entry j goes to out[actives before j], inactive entry j
// to out[total + inactives before j] = out[total + j - actives before j]. A 4096-entry gate is
// one tile.
constexpr int kScanThreads = 256;
constexpr int kScanItems = 16;

template <typename scalar_t>
__device__ __forceinline__ bool is_active(scalar_t v, double threshold) {
  // Compared in double like the CPU kernel, so every backend agrees for any threshold.
  return static_cast<double>(v) > threshold;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kScanThreads)
    compact_kernel(const scalar_t* __restrict__ gate, int64_t N, double threshold, int32_t* __restrict__ idx,
                   int32_t* __restrict__ count) {
  using Scan = cub::BlockScan<int32_t, kScanThreads>;
  using Reduce = cub::BlockReduce<int32_t, kScanThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } temp;
  __shared__ int32_t row_total;

  const scalar_t* row = gate + static_cast<int64_t>(blockIdx.x) * N;
  int32_t* out = idx + static_cast<int64_t>(blockIdx.x) * N;
  constexpr int64_t kTile = int64_t(kScanThreads) * kScanItems;

  int32_t mine = 0;  // pass 1: striped, so a warp reads consecutive entries
  for (int64_t j = threadIdx.x; j < N; j += kScanThreads) mine += is_active(row[j], threshold);
  const int32_t total_in_thread0 = Reduce(temp.reduce).Sum(mine);
  if (threadIdx.x == 0) {
    row_total = total_in_thread0;
    count[blockIdx.x] = total_in_thread0;
  }
  __syncthreads();  // publishes row_total; temp.reduce is free for the scan
  const int64_t total = row_total;

  int64_t actives_before_tile = 0;
  for (int64_t tile = 0; tile < N; tile += kTile) {
    const int64_t first = tile + int64_t(threadIdx.x) * kScanItems;
    bool active[kScanItems];
    int32_t n_active = 0;
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      active[k] = first + k < N && is_active(row[first + k], threshold);
      n_active += active[k];
    }
    int32_t rank_in_tile, tile_actives;
    Scan(temp.scan).ExclusiveSum(n_active, rank_in_tile, tile_actives);
    int64_t rank = actives_before_tile + rank_in_tile;  // actives before entry `first + k`
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t j = first + k;
      if (j >= N) break;
      if (active[k])
        out[rank++] = static_cast<int32_t>(j);
      else
        out[total + j - rank] = static_cast<int32_t>(j);
    }
    actives_before_tile += tile_actives;
    __syncthreads();  // temp.scan is reused by the next tile
  }
}

std::tuple<Tensor, Tensor> compact_cuda(const Tensor& gate, double threshold) {
  check_compact_args(gate);
  const c10::cuda::CUDAGuard guard(gate.device());
  const Tensor g = (gate.dim() == 1 ? gate.unsqueeze(0) : gate).contiguous();
  const int64_t B = g.size(0), N = g.size(1);
  TORCH_CHECK(B <= INT_MAX, "compact: more than 2^31-1 gate rows are not supported");
  Tensor idx = at::empty({B, N}, gate.options().dtype(at::kInt));
  Tensor count = at::empty({B}, gate.options().dtype(at::kInt));
  if (B > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, g.scalar_type(), "compact_cuda", [&] {
      compact_kernel<scalar_t><<<static_cast<unsigned>(B), kScanThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), N, threshold, idx.mutable_data_ptr<int32_t>(),
          count.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (gate.dim() == 1) return {idx.view({N}), count.view({1})};
  return {idx, count};
}

// ----------------------------------------------------------------------------- row launches
// Rows are contiguous blocks of `row_vecs` vectors. A block of kThreads threads is tx x ty:
// tx threads (a power of two, up to kThreads) share one row, so short rows pack several to a
// block and long rows get whole blocks; grid.y splits long rows into chunks of kUnroll * tx
// vectors, and each thread issues kUnroll independent loads before its stores.
constexpr int kUnroll = 2;

struct RowLaunch {
  dim3 grid, block;
};

RowLaunch row_launch(int64_t rows, int64_t row_vecs) {
  int tx = 1;
  while (tx < kThreads && int64_t(tx) * kUnroll < row_vecs) tx *= 2;
  const int ty = kThreads / tx;
  const int64_t gx = ceil_div(rows, ty);
  TORCH_CHECK(gx <= INT_MAX, "dynkernels: too many rows (", rows, ") for one launch");
  const int64_t gy = std::min<int64_t>(ceil_div(row_vecs, int64_t(tx) * kUnroll), kMaxGridY);
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(tx, ty)};
}

// Largest vector width in bytes (16, 8, 4, 2 or 1) that divides the row size and every
// pointer's address, so that each vector access is naturally aligned.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  int width = 16;
  auto fits = [&](int w) {
    if (row_bytes % w) return false;
    for (const void* p : ptrs)
      if (reinterpret_cast<uintptr_t>(p) % w) return false;
    return true;
  };
  while (width > 1 && !fits(width)) width /= 2;
  return width;
}

// This thread's share of copying a row of row_vecs Vec from src to dst: vectors k, k + stride,
// ..., kUnroll independent loads issued before their stores.
template <typename Vec>
__device__ __forceinline__ void copy_row_share(const Vec* __restrict__ src, Vec* __restrict__ dst, int64_t k,
                                               int64_t stride, int64_t row_vecs) {
  for (; k < row_vecs; k += stride * kUnroll) {
    Vec v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (k + u * stride < row_vecs) v[u] = src[k + u * stride];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (k + u * stride < row_vecs) dst[k + u * stride] = v[u];
  }
}

// Calls f with a value of the unsigned type of vector_bytes' width (the unit of a raw copy).
template <typename F>
void with_vector_type(int bytes, F&& f) {
  switch (bytes) {
    case 16: f(uint4{}); break;
    case 8: f(uint2{}); break;
    case 4: f(uint32_t{}); break;
    case 2: f(uint16_t{}); break;
    default: f(uint8_t{}); break;
  }
}

// ----------------------------------------------------------------------------- gather_rows
// A pure copy, so rows move as raw bytes in units of Vec (uint4 = 16 bytes when aligned).
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const Vec* __restrict__ x, const int32_t* __restrict__ idx, const int32_t* __restrict__ count,
                       Vec* __restrict__ y, int64_t N, int64_t M, int64_t capacity, int64_t row_vecs) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= capacity) return;
  const int64_t n = device_count(count, capacity < M ? capacity : M);
  int64_t r = -1;  // source row, or -1 for a zero row
  if (i < n) {
    r = __ldg(idx + i);
    if (r >= N) r = -1;  // out of range (negative ones stay negative): skipped
  }
  Vec* dst = y + i * row_vecs;
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  int64_t k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (r < 0) {
    const Vec zero{};
    for (; k < row_vecs; k += stride) dst[k] = zero;
    return;
  }
  copy_row_share(x + r * row_vecs, dst, k, stride, row_vecs);
}

template <typename Vec>
void launch_gather(const Tensor& xc, const Tensor& idx, const Tensor& count, Tensor& y, int64_t row_bytes) {
  const int64_t row_vecs = row_bytes / int64_t(sizeof(Vec));
  const RowLaunch l = row_launch(y.size(0), row_vecs);
  gather_rows_kernel<Vec><<<l.grid, l.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Vec*>(xc.const_data_ptr()), idx.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(),
      static_cast<Vec*>(y.mutable_data_ptr()), xc.size(0), idx.size(0), y.size(0), row_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor gather_rows_cuda(const Tensor& x, const Tensor& idx, const Tensor& count, int64_t capacity) {
  check_gather_args(x, idx, count, capacity);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = row_layout(x);
  const Tensor xc = x.contiguous(fmt);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = capacity;
  Tensor y = at::empty(sizes, x.options().memory_format(fmt));
  const int64_t row_bytes = row_numel(x) * int64_t(x.element_size());
  if (capacity == 0 || row_bytes == 0) return y;
  const Tensor ic = idx.contiguous();
  with_vector_type(vector_bytes(row_bytes, {xc.const_data_ptr(), y.const_data_ptr()}),
                   [&](auto vec) { launch_gather<decltype(vec)>(xc, ic, count, y, row_bytes); });
  return y;
}

// ----------------------------------------------------------------------------- scatter_add_rows
// One pass over all N rows of base (read base once, y's active rows once, write out once):
// out[r] = base[r] + s[r] * y[i] where r = idx[i] for some i < count, else base[r]. Row r
// finds its i through inv, filled by a small kernel with inv[idx[i]] = i. inv is never
// cleared: a row trusts inv[r] = j only when j < count and idx[j] == r, which an unlisted
// row's stale value cannot satisfy (if idx[j] == r for some j < count, r is listed).
__global__ void inverse_index_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ count, int64_t N,
                                     int64_t limit, int32_t* __restrict__ inv) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= device_count(count, limit)) return;
  const int32_t r = idx[i];
  if (r >= 0 && r < N) inv[r] = static_cast<int32_t>(i);
}

// Elements moved as one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// base + s * y with each operation rounded separately (no fused multiply-add), like the CPU
// kernel and the reference.
__device__ __forceinline__ float add_scaled(float b, float s, float y) { return __fadd_rn(b, __fmul_rn(s, y)); }
__device__ __forceinline__ double add_scaled(double b, double s, double y) { return __dadd_rn(b, __dmul_rn(s, y)); }

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) scatter_add_rows_kernel(
    const Pack<scalar_t, V>* __restrict__ base, const Pack<scalar_t, V>* __restrict__ y,
    const int32_t* __restrict__ idx, const int32_t* __restrict__ count, const int32_t* __restrict__ inv,
    const at::opmath_type<scalar_t>* __restrict__ scale, Pack<scalar_t, V>* __restrict__ out, int64_t N,
    int64_t limit, int64_t row_packs) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= N) return;
  const int64_t n = device_count(count, limit);
  const int64_t j = __ldg(inv + r);
  const bool active = j >= 0 && j < n && __ldg(idx + j) == r;
  const opmath_t s = active && scale != nullptr ? scale[r] : opmath_t(1);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  const Pack<scalar_t, V>* b_row = base + r * row_packs;
  const Pack<scalar_t, V>* y_row = y + (active ? j : 0) * row_packs;
  Pack<scalar_t, V>* o_row = out + r * row_packs;
  for (int64_t k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; k < row_packs; k += stride * kUnroll) {
    Pack<scalar_t, V> b[kUnroll], v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k + u * stride >= row_packs) continue;
      b[u] = b_row[k + u * stride];
      if (active) v[u] = y_row[k + u * stride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k + u * stride >= row_packs) continue;
      if (active) {
#pragma unroll
        for (int e = 0; e < V; ++e)
          b[u].v[e] = static_cast<scalar_t>(
              add_scaled(static_cast<opmath_t>(b[u].v[e]), s, static_cast<opmath_t>(v[u].v[e])));
      }
      o_row[k + u * stride] = b[u];
    }
  }
}

template <typename scalar_t, int V>
void launch_scatter(const Tensor& bc, const Tensor& yc, const Tensor& idx, const Tensor& count, const Tensor& inv,
                    const Tensor& scale, Tensor& out, int64_t limit, int64_t row_elems) {
  using P = Pack<scalar_t, V>;
  const int64_t row_packs = row_elems / V;
  const RowLaunch l = row_launch(bc.size(0), row_packs);
  scatter_add_rows_kernel<scalar_t, V><<<l.grid, l.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const P*>(bc.const_data_ptr()), static_cast<const P*>(yc.const_data_ptr()),
      idx.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(), inv.const_data_ptr<int32_t>(),
      scale.defined() ? scale.const_data_ptr<at::opmath_type<scalar_t>>() : nullptr, static_cast<P*>(out.mutable_data_ptr()),
      bc.size(0), limit, row_packs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor scatter_add_rows_cuda(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count,
                             const std::optional<Tensor>& scale) {
  check_scatter_args(base, y, idx, count, scale);
  const c10::cuda::CUDAGuard guard(base.device());
  const auto fmt = row_layout(base);
  const Tensor bc = base.contiguous(fmt);
  const Tensor yc = y.contiguous(fmt);
  Tensor out = at::empty(base.sizes(), base.options().memory_format(fmt));
  const int64_t N = base.size(0), row_elems = row_numel(base);
  if (N == 0 || row_elems == 0) return out;
  const int64_t limit = std::min(y.size(0), idx.size(0));
  const Tensor ic = idx.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();

  // Left uninitialised on purpose (one launch fewer): see inverse_index_kernel.
  Tensor inv = at::empty({N}, idx.options());
  if (limit > 0) {
    inverse_index_kernel<<<static_cast<unsigned>(ceil_div(limit, kThreads)), kThreads, 0, stream>>>(
        ic.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(), N, limit, inv.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "scatter_add_rows_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Tensor s;
    if (scale.has_value()) s = scale->to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int64_t row_bytes = row_elems * int64_t(sizeof(scalar_t));
    if (vector_bytes(row_bytes, {bc.const_data_ptr(), yc.const_data_ptr(), out.const_data_ptr()}) == 16)
      launch_scatter<scalar_t, kVec>(bc, yc, ic, count, inv, s, out, limit, row_elems);
    else
      launch_scatter<scalar_t, 1>(bc, yc, ic, count, inv, s, out, limit, row_elems);
  });
  return out;
}

// ----------------------------------------------------------------------------- scatter_rows
// The overwrite merge in one pass, a pure copy like gather (raw bytes in units of Vec): the
// thread row for position i of idx copies y[i] (i < count) or base[idx[i]] (i >= count) to
// out[idx[i]]. idx being a permutation, every output row is written exactly once and every
// source row read once; no inverse index is needed.
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const Vec* __restrict__ base, const Vec* __restrict__ y, const int32_t* __restrict__ idx,
                        const int32_t* __restrict__ count, Vec* __restrict__ out, int64_t N, int64_t limit,
                        int64_t row_vecs) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= N) return;
  const int64_t r = __ldg(idx + i);
  if (r < 0 || r >= N) return;  // out of range: skipped
  const Vec* src = i < device_count(count, limit) ? y + i * row_vecs : base + r * row_vecs;
  copy_row_share(src, out + r * row_vecs, int64_t(blockIdx.y) * blockDim.x + threadIdx.x,
                 int64_t(gridDim.y) * blockDim.x, row_vecs);
}

template <typename Vec>
void launch_scatter_rows(const Tensor& bc, const Tensor& yc, const Tensor& idx, const Tensor& count, Tensor& out,
                         int64_t limit, int64_t row_bytes) {
  const int64_t row_vecs = row_bytes / int64_t(sizeof(Vec));
  const RowLaunch l = row_launch(bc.size(0), row_vecs);
  scatter_rows_kernel<Vec><<<l.grid, l.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Vec*>(bc.const_data_ptr()), static_cast<const Vec*>(yc.const_data_ptr()),
      idx.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(), static_cast<Vec*>(out.mutable_data_ptr()),
      bc.size(0), limit, row_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor scatter_rows_cuda(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  check_scatter_rows_args("scatter_rows", base, y, idx, count, /*in_place=*/false);
  const c10::cuda::CUDAGuard guard(base.device());
  const auto fmt = row_layout(base);
  const Tensor bc = base.contiguous(fmt);
  const Tensor yc = y.contiguous(fmt);
  Tensor out = at::empty(base.sizes(), base.options().memory_format(fmt));
  const int64_t N = base.size(0);
  const int64_t row_bytes = row_numel(base) * int64_t(base.element_size());
  if (N == 0 || row_bytes == 0) return out;
  const int64_t limit = std::min(y.size(0), N);
  const Tensor ic = idx.contiguous();
  with_vector_type(vector_bytes(row_bytes, {bc.const_data_ptr(), yc.const_data_ptr(), out.const_data_ptr()}),
                   [&](auto vec) { launch_scatter_rows<decltype(vec)>(bc, yc, ic, count, out, limit, row_bytes); });
  return out;
}

// ----------------------------------------------------------------------------- scatter_rows_
// In place: the thread row for position i < count copies y[i] to base[idx[i]]; nothing else is
// read or written. The launch covers min(y rows, M) positions, count is read on the device.
template <typename Vec>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_inplace_kernel(Vec* __restrict__ base, const Vec* __restrict__ y, const int32_t* __restrict__ idx,
                                const int32_t* __restrict__ count, int64_t N, int64_t limit, int64_t row_vecs) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  if (i >= device_count(count, limit)) return;
  const int64_t r = __ldg(idx + i);
  if (r < 0 || r >= N) return;  // out of range: skipped
  copy_row_share(y + i * row_vecs, base + r * row_vecs, int64_t(blockIdx.y) * blockDim.x + threadIdx.x,
                 int64_t(gridDim.y) * blockDim.x, row_vecs);
}

template <typename Vec>
void launch_scatter_rows_inplace(Tensor& base, const Tensor& yc, const Tensor& idx, const Tensor& count,
                                 int64_t limit, int64_t row_bytes) {
  const int64_t row_vecs = row_bytes / int64_t(sizeof(Vec));
  const RowLaunch l = row_launch(limit, row_vecs);
  scatter_rows_inplace_kernel<Vec><<<l.grid, l.block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<Vec*>(base.mutable_data_ptr()), static_cast<const Vec*>(yc.const_data_ptr()),
      idx.const_data_ptr<int32_t>(), count.const_data_ptr<int32_t>(), base.size(0), limit, row_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scatter_rows_inplace_cuda(Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  check_scatter_rows_args("scatter_rows_", base, y, idx, count, /*in_place=*/true);
  const c10::cuda::CUDAGuard guard(base.device());
  const Tensor yc = y.contiguous(row_layout(base));
  const int64_t limit = std::min(y.size(0), idx.size(0));
  const int64_t row_bytes = row_numel(base) * int64_t(base.element_size());
  if (limit == 0 || row_bytes == 0 || base.size(0) == 0) return;
  const Tensor ic = idx.contiguous();
  with_vector_type(vector_bytes(row_bytes, {base.const_data_ptr(), yc.const_data_ptr()}), [&](auto vec) {
    launch_scatter_rows_inplace<decltype(vec)>(base, yc, ic, count, limit, row_bytes);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) {
  m.impl("compact", &compact_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_add_rows", &scatter_add_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("scatter_rows_", &scatter_rows_inplace_cuda);
}

}  // namespace dynkernels
