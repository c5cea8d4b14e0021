// Argument checks shared by the CPU and CUDA kernels of compact, gather_rows, scatter_add_rows,
// scatter_rows and scatter_rows_, so every backend rejects the same inputs with the same
// messages (output layouts: layout.h). Contract: DESIGN.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "layout.h"

namespace dynkernels {

// idx: int32, [rows] (a permutation of the rows) or, with any_length, [M] for any M; count: one
// int32; both on the data's device.
inline void check_index_args(const char* op, const at::Tensor& idx, const at::Tensor& count, int64_t rows,
                             const char* rows_of, const at::Tensor& data, bool any_length) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kInt, op, ": idx must be a 1-D int32 tensor, got ",
              idx.scalar_type(), " of shape ", idx.sizes());
  TORCH_CHECK(any_length || idx.size(0) == rows, op, ": idx has ", idx.size(0), " entries but ", rows_of, " has ",
              rows, " rows");
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kInt, op,
              ": count must be an int32 tensor with one element, got ", count.scalar_type(), " of shape ",
              count.sizes());
  TORCH_CHECK(idx.device() == data.device() && count.device() == data.device(), op, ": idx (on ", idx.device(),
              ") and count (on ", count.device(), ") must be on ", rows_of, "'s device ", data.device());
}

inline void check_compact_args(const at::Tensor& gate) {
  TORCH_CHECK(gate.dim() == 1 || gate.dim() == 2, "compact: gate must be [N] or [B, N], got shape ", gate.sizes());
  TORCH_CHECK(gate.size(-1) <= std::numeric_limits<int32_t>::max(),
              "compact: gate rows longer than 2^31-1 are not supported");
}

inline void check_gather_args(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count, int64_t capacity) {
  TORCH_CHECK(x.dim() >= 1, "gather_rows: x must have at least one dimension");
  TORCH_CHECK(capacity >= 0, "gather_rows: capacity must be >= 0, got ", capacity);
  check_index_args("gather_rows", idx, count, x.size(0), "x", x, /*any_length=*/true);
}

inline void check_scatter_args(const at::Tensor& base, const at::Tensor& y, const at::Tensor& idx,
                               const at::Tensor& count, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(base.dim() >= 1, "scatter_add_rows: base must have at least one dimension");
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), "scatter_add_rows: base must be a floating tensor, got ",
              base.scalar_type());
  TORCH_CHECK(y.dim() == base.dim() && y.sizes().slice(1) == base.sizes().slice(1),
              "scatter_add_rows: y must be [capacity, ", base.sizes().slice(1), "] like base's rows, got ",
              y.sizes());
  TORCH_CHECK(y.scalar_type() == base.scalar_type(), "scatter_add_rows: y must have base's dtype ",
              base.scalar_type(), ", got ", y.scalar_type());
  TORCH_CHECK(y.device() == base.device(), "scatter_add_rows: y is on ", y.device(), " but base is on ",
              base.device());
  const int64_t N = base.size(0);
  check_index_args("scatter_add_rows", idx, count, N, "base", base, /*any_length=*/true);
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == N && at::isFloatingType(scale->scalar_type()),
                "scatter_add_rows: scale must be a 1-D floating tensor with ", N, " entries, got ",
                scale->scalar_type(), " of shape ", scale->sizes());
    TORCH_CHECK(scale->device() == base.device(), "scatter_add_rows: scale is on ", scale->device(),
                " but base is on ", base.device());
  }
}

// scatter_rows and scatter_rows_ are copies: any dtype, y's rows shaped like base's. That idx
// is a permutation (scatter_rows) or that its first count entries are distinct (scatter_rows_)
// is checked by the CPU kernels only (on a GPU it would cost a host sync). scatter_rows_ writes
// into base itself, so base's rows must be contiguous blocks (contiguous, or channels_last).
inline void check_scatter_rows_args(const char* op, const at::Tensor& base, const at::Tensor& y,
                                    const at::Tensor& idx, const at::Tensor& count, bool in_place) {
  TORCH_CHECK(base.dim() >= 1, op, ": base must have at least one dimension");
  TORCH_CHECK(y.dim() == base.dim() && y.sizes().slice(1) == base.sizes().slice(1), op, ": y must be [capacity, ",
              base.sizes().slice(1), "] like base's rows, got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == base.scalar_type(), op, ": y must have base's dtype ", base.scalar_type(), ", got ",
              y.scalar_type());
  TORCH_CHECK(y.device() == base.device(), op, ": y is on ", y.device(), " but base is on ", base.device());
  if (in_place)
    TORCH_CHECK(base.is_contiguous(row_layout(base)), op,
                ": base is written in place, so it must be contiguous (or channels_last), got strides ",
                base.strides());
  check_index_args(op, idx, count, base.size(0), "base", base, /*any_length=*/in_place);
}

}  // namespace dynkernels
