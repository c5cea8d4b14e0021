// CPU kernels for compact, gather_rows, scatter_add_rows, scatter_rows and scatter_rows_ (contract:
// DESIGN.md).
// Rows are the dim-0 slices; for 4-D tensors in channels_last each row is still one
// contiguous block, so both layouts are copied block by block and keep their layout.
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../sample_gating_common.h"
#include "vector_clones.h"

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

// The index values, checked here for CPU tensors (reading them is free on the host) with the
// errors and messages of the Python functions (dynkernels/ops/_checks.py), which leave these
// checks to this kernel: IndexError for an index out of range, ValueError for a repeated row.

// idx[i] in [0, rows) for i < n; else an IndexError naming the first bad position.
void check_index_range(const char* op, const int32_t* idx, int64_t n, int64_t rows, const char* rows_of) {
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(idx[i] >= 0 && idx[i] < rows, op, ": idx[", i, "] = ", idx[i], " is out of range for ", rows_of,
                      " with ", rows, " rows");
}

// Position in idx[:n] of every row, -1 for the rows it does not list; a RuntimeError if it
// lists a row twice (idx[:n] must be in range).
std::vector<int64_t> positions_of_rows(const char* op, const int32_t* idx, int64_t n, int64_t rows) {
  std::vector<int64_t> pos(rows, -1);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(pos[idx[i]] < 0, op, ": idx repeats row ", idx[i], " among its first count entries; rows must be distinct");
    pos[idx[i]] = i;
  }
  return pos;
}

// scatter_rows needs every one of the N rows listed exactly once: then each output row is
// written exactly once, and none is left uninitialised. All entries in range first, then the
// smallest row listed twice is named (as the Python check does).
void check_permutation(const char* op, const int32_t* idx, int64_t rows) {
  check_index_range(op, idx, rows, rows, "base");
  std::vector<int32_t> seen(rows, 0);
  for (int64_t i = 0; i < rows; ++i) ++seen[idx[i]];
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(seen[r] <= 1, op, ": idx lists row ", r, " more than once; idx must be a permutation of base's ",
                      rows, " rows (as compact returns)");
}

// dst[k] = b[k] + s * y[k] (float32, the fast path of scatter_add_rows), per vector ISA.
DK_VECTOR_CLONES
void add_scaled_row(float* __restrict dst, const float* __restrict b, float s, const float* __restrict y, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = b[k] + s * y[k];
}

// The other dtypes: formed in opmath_t, rounded once.
template <typename scalar_t, typename opmath_t>
void add_scaled_row(scalar_t* dst, const scalar_t* b, opmath_t s, const scalar_t* y, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    dst[k] = static_cast<scalar_t>(static_cast<opmath_t>(b[k]) + s * static_cast<opmath_t>(y[k]));
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
  // (at::detail::empty_cpu: no dispatch for the allocation, about 1 us of a 4.5 us call on tiny
  // tensors; every element is written below)
  Tensor y = at::detail::empty_cpu(sizes, x.options().memory_format(fmt));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  check_index_range("gather_rows", ip, clamped_count(count, idx.size(0)), N, "x");
  const int64_t n = clamped_count(count, std::min(capacity, idx.size(0)));

  const int64_t row_bytes = row_numel(x) * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(y.mutable_data_ptr());
  at::parallel_for(0, capacity, rows_per_task(row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < std::min(i1, n);) {
      int64_t run = 1;  // rows that are consecutive in x too: one copy (all of them at density 1)
      while (i + run < std::min(i1, n) && ip[i + run] == ip[i] + run) ++run;
      std::memcpy(dst + i * row_bytes, src + static_cast<int64_t>(ip[i]) * row_bytes, run * row_bytes);
      i += run;
    }
    if (std::max(i0, n) < i1) std::memset(dst + std::max(i0, n) * row_bytes, 0, (i1 - std::max(i0, n)) * row_bytes);
  });
  return y;
}

// One pass: each output row is written once, from base's row plus its scaled row of y (the
// rows idx[:count] lists) or as a copy of base's row (the others).
Tensor scatter_add_rows_cpu(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count,
                            const std::optional<Tensor>& scale) {
  check_scatter_args(base, y, idx, count, scale);
  const int64_t N = base.size(0);
  const auto fmt = row_layout(base);
  const Tensor bc = base.contiguous(fmt);
  const Tensor yc = y.contiguous(fmt);
  Tensor out = at::detail::empty_cpu(base.sizes(), base.options().memory_format(fmt));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  check_index_range("scatter_add_rows", ip, clamped_count(count, idx.size(0)), N, "base");
  const int64_t n = clamped_count(count, std::min(y.size(0), idx.size(0)));
  const std::vector<int64_t> pos = positions_of_rows("scatter_add_rows", ip, n, N);
  const int64_t row = row_numel(base);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "scatter_add_rows_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    Tensor s;
    if (scale.has_value()) s = scale->to(c10::CppTypeToScalarType<opmath_t>::value).contiguous();
    const opmath_t* sp = s.defined() ? s.const_data_ptr<opmath_t>() : nullptr;
    const scalar_t* bp = bc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, rows_per_task(row * static_cast<int64_t>(sizeof(scalar_t))), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* b = bp + r * row;
        scalar_t* dst = op + r * row;
        if (pos[r] < 0) {
          std::memcpy(dst, b, row * sizeof(scalar_t));
          continue;
        }
        const opmath_t s_r = sp ? sp[r] : opmath_t(1);
        const scalar_t* src = yp + pos[r] * row;
        add_scaled_row(dst, b, s_r, src, row);
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
  Tensor out = at::detail::empty_cpu(base.sizes(), base.options().memory_format(fmt));
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
  const int64_t N = base.size(0);
  const Tensor yc = y.contiguous(row_layout(base));
  const Tensor ic = idx.contiguous();
  const int32_t* ip = ic.const_data_ptr<int32_t>();
  check_index_range("scatter_rows_", ip, clamped_count(count, idx.size(0)), N, "base");
  const int64_t n = clamped_count(count, std::min(y.size(0), idx.size(0)));
  std::vector<char> seen(N, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(!seen[ip[i]], "scatter_rows_: the first count entries of idx list row ", ip[i],
                      " more than once; they must be distinct");
    seen[ip[i]] = 1;
  }
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
