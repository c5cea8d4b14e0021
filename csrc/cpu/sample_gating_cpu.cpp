// CPU kernels for compact, gather_rows, scatter_add_rows, scatter_rows and scatter_rows_ (contract:
// DESIGN.md).
// Rows are the dim-0 slices; for 4-D tensors in channels_last each row is still one
// contiguous block, so both layouts are copied block by block and keep their layout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../sample_gating_common.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace dynkernels {
namespace {

using at::Tensor;

// Number of rows to move: count clamped to [0, limit].
int64_t clamped_count(const Tensor& count, int64_t limit) {
  int64_t c = count.contiguous().const_data_ptr<int32_t>()[0];
  return std::max<int64_t>(0, std::min<int64_t>(c, limit));
}

void check_index_range(const char* op, const int32_t* idx, int64_t n, int64_t rows, bool distinct) {
  std::vector<char> seen(distinct ? rows : 0, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = idx[i];
    TORCH_CHECK(r >= 0 && r < rows, op, ": idx[", i, "] = ", r, " is out of range for ", rows, " rows");
    if (distinct) {
      TORCH_CHECK(!seen[r], op, ": idx repeats row ", r, " among its first count entries; rows must be distinct");
      seen[r] = 1;
    }
  }
}

// scatter_rows needs every one of the N rows listed exactly once: then each output row is
// written exactly once, and none is left uninitialised.
void check_permutation(const char* op, const int32_t* idx, int64_t rows) {
  std::vector<char> seen(rows, 0);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = idx[i];
    TORCH_CHECK(r >= 0 && r < rows, op, ": idx[", i, "] = ", r, " is out of range for ", rows, " rows");
    TORCH_CHECK(!seen[r], op, ": idx lists row ", r, " twice; idx must be a permutation of the ", rows,
                " rows (as compact returns)");
    seen[r] = 1;
  }
}

// Rows per parallel task: enough bytes per task (64 KiB) that starting a thread costs little
// next to the copy; small tensors then run on the calling thread.
inline int64_t rows_per_task(int64_t row_bytes) {
  constexpr int64_t kTaskBytes = 64 * 1024;
  return std::max<int64_t>(1, kTaskBytes / std::max<int64_t>(1, row_bytes));
}

std::tuple<Tensor, Tensor> compact_cpu(const Tensor& gate, double threshold) {
  check_compact_args(gate);
  const Tensor g = (gate.dim() == 1 ? gate.unsqueeze(0) : gate).contiguous();
  const int64_t B = g.size(0), N = g.size(1);
  Tensor idx = at::empty({B, N}, gate.options().dtype(at::kInt));
  Tensor count = at::empty({B}, gate.options().dtype(at::kInt));
  int32_t* ip = idx.mutable_data_ptr<int32_t>();
  int32_t* cp = count.mutable_data_ptr<int32_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, g.scalar_type(), "compact_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, rows_per_task(N * g.element_size()), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row = gp + b * N;
        int32_t* out = ip + b * N;
        int32_t active = 0;
        for (int64_t j = 0; j < N; ++j)
          if (static_cast<double>(row[j]) > threshold) out[active++] = static_cast<int32_t>(j);
        int32_t k = active;
        for (int64_t j = 0; j < N; ++j)
          if (!(static_cast<double>(row[j]) > threshold)) out[k++] = static_cast<int32_t>(j);
        cp[b] = active;
      }
    });
  });
  if (gate.dim() == 1) return {idx.view({N}), count.view({1})};
  return {idx, count};
}

Tensor gather_rows_cpu(const Tensor& x, const Tensor& idx, const Tensor& count, int64_t capacity) {
  check_gather_args(x, idx, count, capacity);
  const int64_t N = x.size(0);
  const auto fmt = row_layout(x);
  const Tensor xc = x.contiguous(fmt);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = capacity;
  Tensor y = at::empty(sizes, x.options().memory_format(fmt));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  const int64_t n = clamped_count(count, std::min(capacity, idx.size(0)));
  check_index_range("gather_rows", ip, n, N, /*distinct=*/false);

  const int64_t row_bytes = row_numel(x) * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(y.mutable_data_ptr());
  at::parallel_for(0, capacity, rows_per_task(row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i < n)
        std::memcpy(dst + i * row_bytes, src + static_cast<int64_t>(ip[i]) * row_bytes, row_bytes);
      else
        std::memset(dst + i * row_bytes, 0, row_bytes);
    }
  });
  return y;
}

Tensor scatter_add_rows_cpu(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count,
                            const std::optional<Tensor>& scale) {
  check_scatter_args(base, y, idx, count, scale);
  const int64_t N = base.size(0);
  const auto fmt = row_layout(base);
  Tensor out = base.clone(fmt);
  const Tensor yc = y.contiguous(fmt);
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  const int64_t n = clamped_count(count, std::min(y.size(0), idx.size(0)));
  check_index_range("scatter_add_rows", ip, n, N, /*distinct=*/true);
  const int64_t row = row_numel(base);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "scatter_add_rows_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Tensor s;
    if (scale.has_value()) s = scale->to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* sp = s.defined() ? s.const_data_ptr<opmath_t>() : nullptr;
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, rows_per_task(row * static_cast<int64_t>(sizeof(scalar_t))), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = ip[i];
        const opmath_t s_r = sp ? sp[r] : opmath_t(1);
        scalar_t* dst = op + r * row;
        const scalar_t* src = yp + i * row;
        for (int64_t k = 0; k < row; ++k)
          dst[k] = static_cast<scalar_t>(static_cast<opmath_t>(dst[k]) + s_r * static_cast<opmath_t>(src[k]));
      }
    });
  });
  return out;
}

// One pass: each output row is copied once, from y (the first count positions of idx) or
// from base (the others).
Tensor scatter_rows_cpu(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  check_scatter_rows_args("scatter_rows", base, y, idx, count, /*in_place=*/false);
  const int64_t N = base.size(0);
  const auto fmt = row_layout(base);
  const Tensor bc = base.contiguous(fmt);
  const Tensor yc = y.contiguous(fmt);
  Tensor out = at::empty(base.sizes(), base.options().memory_format(fmt));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  check_permutation("scatter_rows", ip, N);
  const int64_t n = clamped_count(count, std::min(y.size(0), N));

  const int64_t row_bytes = row_numel(base) * static_cast<int64_t>(base.element_size());
  if (row_bytes == 0) return out;
  const char* bp = static_cast<const char*>(bc.const_data_ptr());
  const char* yp = static_cast<const char*>(yc.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  at::parallel_for(0, N, rows_per_task(row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = ip[i];
      const char* src = i < n ? yp + i * row_bytes : bp + r * row_bytes;
      std::memcpy(op + r * row_bytes, src, row_bytes);
    }
  });
  return out;
}

// In place: only the first count rows of idx are written (from y); the rest of base is untouched.
void scatter_rows_inplace_cpu(Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  check_scatter_rows_args("scatter_rows_", base, y, idx, count, /*in_place=*/true);
  const Tensor yc = y.contiguous(row_layout(base));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  const int64_t n = clamped_count(count, std::min(y.size(0), idx.size(0)));
  check_index_range("scatter_rows_", ip, n, base.size(0), /*distinct=*/true);
  const int64_t row_bytes = row_numel(base) * static_cast<int64_t>(base.element_size());
  if (row_bytes == 0) return;
  const char* yp = static_cast<const char*>(yc.const_data_ptr());
  char* bp = static_cast<char*>(base.mutable_data_ptr());
  at::parallel_for(0, n, rows_per_task(row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(bp + static_cast<int64_t>(ip[i]) * row_bytes, yp + i * row_bytes, row_bytes);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dynkernels, CPU, m) {
  m.impl("compact", &compact_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_add_rows", &scatter_add_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("scatter_rows_", &scatter_rows_inplace_cpu);
}

}  // namespace dynkernels
