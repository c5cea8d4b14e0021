// Argument checks and output shapes shared by the CPU and CUDA kernels of route (contract:
// DESIGN.md), so both reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace dynkernels {

inline void check_route_args(const at::Tensor& choice, int64_t num_branches) {
  TORCH_CHECK(choice.dim() == 1 || choice.dim() == 2, "route: choice must be [N] or [R, N], got shape ",
              choice.sizes());
  TORCH_CHECK(at::isIntegralType(choice.scalar_type(), /*includeBool=*/false),
              "route: choice must be an integer tensor, got ", choice.scalar_type());
  TORCH_CHECK(num_branches >= 1 && num_branches < std::numeric_limits<int32_t>::max(),
              "route: num_branches must be in [1, 2^31 - 2], got ", num_branches);
  TORCH_CHECK(choice.size(-1) <= std::numeric_limits<int32_t>::max(),
              "route: rows longer than 2^31-1 are not supported");
}

// (idx [R, N], offsets [R, num_branches + 1]) to be filled, and the [R, N] view of choice.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> route_outputs(const at::Tensor& choice, int64_t num_branches) {
  const at::Tensor c = (choice.dim() == 1 ? choice.unsqueeze(0) : choice).contiguous();
  at::Tensor idx = at::empty(c.sizes(), choice.options().dtype(at::kInt));
  at::Tensor offsets = at::empty({c.size(0), num_branches + 1}, choice.options().dtype(at::kInt));
  return {c, idx, offsets};
}

// The outputs in choice's rank: [N] and [num_branches + 1] for a 1-D choice.
inline std::tuple<at::Tensor, at::Tensor> route_result(const at::Tensor& choice, at::Tensor idx, at::Tensor offsets) {
  if (choice.dim() == 1) return {idx.view({idx.size(1)}), offsets.view({offsets.size(1)})};
  return {idx, offsets};
}

}  // namespace dynkernels
