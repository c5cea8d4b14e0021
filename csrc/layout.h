// Output layouts shared by every C++ and CUDA kernel (the same rule as dynkernels/_layout.py,
// which the fake kernels and the Triton kernels follow).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dynkernels {

// Layout of an output made from x's rows: channels_last only when x is a 4-D tensor that is
// channels_last and not also plain contiguous; contiguous otherwise. Either way each dim-0
// row is one contiguous block, so kernels copy rows as flat blocks.
inline at::MemoryFormat row_layout(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// Elements in one dim-0 row.
inline int64_t row_numel(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

}  // namespace dynkernels
