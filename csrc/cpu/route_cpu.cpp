// CPU kernel for route (contract: DESIGN.md): a stable counting sort of each row by branch.
// Out-of-range choices are an error here (reading them costs nothing on the CPU); the GPU
// kernels list such rows after every branch instead.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../route_common.h"

#include <string>
#include <tuple>
#include <vector>

namespace dynkernels {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> route_cpu(const Tensor& choice, int64_t num_branches) {
  check_route_args(choice, num_branches);
  Tensor c, idx, offsets;  // (not a structured binding: the kernel lambda captures them, a C++20 feature)
  std::tie(c, idx, offsets) = route_outputs(choice, num_branches);
  const int64_t R = c.size(0), N = c.size(1);
  int32_t* ip = idx.mutable_data_ptr<int32_t>();
  int32_t* op = offsets.mutable_data_ptr<int32_t>();
  AT_DISPATCH_INTEGRAL_TYPES(c.scalar_type(), "route_cpu", [&] {
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    // One row per task: rows are a batch long, so a row is little work.
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> cursor(num_branches + 1);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = cp + r * N;
        int32_t* out = ip + r * N;
        int32_t* off = op + r * (num_branches + 1);
        std::fill(off, off + num_branches + 1, 0);
        for (int64_t j = 0; j < N; ++j) {
          const int64_t b = static_cast<int64_t>(row[j]);
          TORCH_CHECK(b >= 0 && b < num_branches, "route: choice[", (choice.dim() == 2 ? std::to_string(r) + ", " : ""),
                      j, "] = ", b, " is out of range for ", num_branches, " branches");
          ++off[b + 1];
        }
        for (int64_t b = 0; b < num_branches; ++b) off[b + 1] += off[b];  // counts -> starts
        std::copy(off, off + num_branches + 1, cursor.begin());
        for (int64_t j = 0; j < N; ++j) out[cursor[static_cast<int64_t>(row[j])]++] = static_cast<int32_t>(j);
      }
    });
  });
  return route_result(choice, idx, offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace dynkernels
