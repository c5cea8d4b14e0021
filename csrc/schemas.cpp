// The one place where the dynkernels operator schemas are defined. Each backend file
// (csrc/cpu/*.cpp, csrc/cuda/*.cu) registers its kernels with TORCH_LIBRARY_IMPL; fake
// kernels and autograd are registered in Python (dynkernels/ops/). Contract: DESIGN.md.
#include <torch/library.h>

TORCH_LIBRARY(dynkernels, m) {
  // Sample gating: stable partition of a gate into active-then-inactive positions.
  m.def("compact(Tensor gate, float threshold) -> (Tensor idx, Tensor count)");
  // y[i] = x[idx[i]] for i < count, zero rows up to capacity. idx may have any length M (count
  // is clamped to it): compact's idx, or one branch's part of route's idx.
  m.def("gather_rows(Tensor x, Tensor idx, Tensor count, int capacity) -> Tensor");
  // out = base; out[idx[i]] += scale[idx[i]] * y[i] for i < count (idx of any length).
  m.def("scatter_add_rows(Tensor base, Tensor y, Tensor idx, Tensor count, Tensor? scale) -> Tensor");
  // The overwrite merge, one pass: out[idx[i]] = y[i] for i < count, else base[idx[i]];
  // idx is a permutation of base's rows (as compact returns).
  m.def("scatter_rows(Tensor base, Tensor y, Tensor idx, Tensor count) -> Tensor");
  // The same merge in place: base[idx[i]] = y[i] for i < count, every other row untouched; idx
  // of any length (e.g. one branch's part of route's idx), its first count entries distinct.
  m.def("scatter_rows_(Tensor(a!) base, Tensor y, Tensor idx, Tensor count) -> ()");

  // Routing: stable partition of the rows of choice [N] (or each row of [R, N]) by branch;
  // offsets [num_branches + 1] (or [R, num_branches + 1]) say where each branch's rows start.
  m.def("route(Tensor choice, int num_branches) -> (Tensor idx, Tensor offsets)");

  // Channel gating: conv2d that computes only the active (sample, channel) pairs:
  // y = out_gate * (conv + bias) + shift where out_gate > 0, else 0. config: a kernel tile
  // configuration of the backend (-1: its own choice; the CPU kernel has one and ignores it).
  m.def(
      "channel_sparse_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor out_gate, Tensor? in_gate, "
      "int[2] stride, int[2] padding, int[2] dilation, Tensor? shift=None, int config=-1) -> Tensor");
}
