// CUDA kernel for route (contract: DESIGN.md), with the semantics, checks and output shapes of
// csrc/cpu/route_cpu.cpp, except that an out-of-range choice is not an error (reading it on the
// host would cost a sync): such rows belong to no branch and are listed last, after
// offsets[num_branches], in increasing order. No host synchronisation.
//
// One thread block per row of choice: a stable counting sort in one pass over a [keys x warps]
// table of counts (key = branch, or num_branches for "no branch"). Warp w owns the w-th
// contiguous chunk of the row. (1) Each warp counts its chunk per key: lanes holding the same
// key find each other with __match_any_sync and their lowest lane adds the group's size, so
// every table entry has one writer. (2) A block-wide exclusive scan of the table in key-major,
// warp-minor order turns each count into the position where that warp's rows of that key start
// (and offsets[k] is the entry of warp 0). (3) Each warp walks its chunk again in order and
// writes every row to its key's position plus its rank among the lanes of its group; the
// group's lowest lane advances the position. Chunks in warp order and lanes in order keep the
// partition stable. Meant for batch-sized rows (one block per row).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <climits>
#include <cstdint>
#include <tuple>

#include "../route_common.h"

namespace dynkernels {
namespace {

using at::Tensor;

constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;
constexpr int kScanItems = 4;
// Largest table (keys x warps, int32) kept in shared memory (40 KiB, so that with the scan's
// temporary storage the block stays within the 48 KiB available without opting in); larger
// tables (more than 1279 branches) live in global memory.
constexpr int64_t kSharedTableEntries = 40 * 1024 / 4;

template <typename scalar_t>
__device__ __forceinline__ int32_t route_key(scalar_t v, int64_t num_branches) {
  const int64_t c = static_cast<int64_t>(v);
  return (c >= 0 && c < num_branches) ? static_cast<int32_t>(c) : static_cast<int32_t>(num_branches);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
    route_kernel(const scalar_t* __restrict__ choice, int64_t N, int64_t num_branches, int32_t* __restrict__ idx,
                 int32_t* __restrict__ offsets, int32_t* __restrict__ global_table, bool table_in_global) {
  using Scan = cub::BlockScan<int32_t, kRouteThreads>;
  __shared__ typename Scan::TempStorage scan_temp;
  extern __shared__ int32_t shared_table[];

  const int64_t keys = num_branches + 1;
  const int64_t entries = keys * kRouteWarps;
  int32_t* table = table_in_global ? global_table + int64_t(blockIdx.x) * entries : shared_table;
  const scalar_t* row = choice + int64_t(blockIdx.x) * N;
  int32_t* out = idx + int64_t(blockIdx.x) * N;
  int32_t* row_offsets = offsets + int64_t(blockIdx.x) * keys;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned lanes_before = (1u << lane) - 1u;
  const int64_t chunk = (N + kRouteWarps - 1) / kRouteWarps;
  const int64_t begin = warp * chunk, end = begin + chunk < N ? begin + chunk : N;

  for (int64_t e = threadIdx.x; e < entries; e += kRouteThreads) table[e] = 0;
  __syncthreads();

  // (1) counts per (key, warp)
  for (int64_t base = begin; base < end; base += 32) {  // the trip count is the same for the whole warp
    const int64_t j = base + lane;
    const int32_t key = j < end ? route_key(row[j], num_branches) : -1;
    const unsigned group = __match_any_sync(0xffffffffu, key);
    if (key >= 0 && lane == __ffs(group) - 1) table[key * kRouteWarps + warp] += __popc(group);
    __syncwarp();
  }
  __syncthreads();

  // (2) exclusive scan of the table, key-major: entry (k, w) becomes where warp w's rows of key k start
  int32_t running = 0;
  for (int64_t tile = 0; tile < entries; tile += int64_t(kRouteThreads) * kScanItems) {
    const int64_t first = tile + int64_t(threadIdx.x) * kScanItems;
    int32_t items[kScanItems];
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) items[k] = first + k < entries ? table[first + k] : 0;
    int32_t tile_total;
    Scan(scan_temp).ExclusiveSum(items, items, tile_total);
#pragma unroll
    for (int k = 0; k < kScanItems; ++k) {
      const int64_t e = first + k;
      if (e >= entries) break;
      table[e] = running + items[k];
      if (e % kRouteWarps == 0) row_offsets[e / kRouteWarps] = running + items[k];
    }
    running += tile_total;
    __syncthreads();  // scan_temp is reused by the next tile
  }

  // (3) stable placement
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t j = base + lane;
    const int32_t key = j < end ? route_key(row[j], num_branches) : -1;
    const unsigned group = __match_any_sync(0xffffffffu, key);
    const int leader = __ffs(group) - 1;
    int32_t start = 0;
    if (key >= 0 && lane == leader) start = table[key * kRouteWarps + warp];
    start = __shfl_sync(0xffffffffu, start, leader);
    if (key >= 0) {
      out[start + __popc(group & lanes_before)] = static_cast<int32_t>(j);
      if (lane == leader) table[key * kRouteWarps + warp] = start + __popc(group);
    }
    __syncwarp();
  }
}

std::tuple<Tensor, Tensor> route_cuda(const Tensor& choice, int64_t num_branches) {
  check_route_args(choice, num_branches);
  const c10::cuda::CUDAGuard guard(choice.device());
  Tensor c, idx, offsets;  // (not a structured binding: the kernel lambda captures them, a C++20 feature)
  std::tie(c, idx, offsets) = route_outputs(choice, num_branches);
  const int64_t R = c.size(0), N = c.size(1);
  TORCH_CHECK(R <= INT_MAX, "route: more than 2^31-1 rows of choice are not supported");
  if (R > 0) {
    const int64_t entries = (num_branches + 1) * kRouteWarps;
    const bool table_in_global = entries > kSharedTableEntries;
    Tensor table;
    if (table_in_global) table = at::empty({R * entries}, choice.options().dtype(at::kInt));
    const size_t shared_bytes = table_in_global ? 0 : size_t(entries) * sizeof(int32_t);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_INTEGRAL_TYPES(c.scalar_type(), "route_cuda", [&] {
      route_kernel<scalar_t><<<static_cast<unsigned>(R), kRouteThreads, shared_bytes, stream>>>(
          c.const_data_ptr<scalar_t>(), N, num_branches, idx.mutable_data_ptr<int32_t>(),
          offsets.mutable_data_ptr<int32_t>(), table_in_global ? table.mutable_data_ptr<int32_t>() : nullptr,
          table_in_global);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return route_result(choice, idx, offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace dynkernels
