// Direct calls of the sample-gating operators and the channel-sparse conv from Python, below
// autograd. A call through torch.ops parses its arguments against the schema in Python and, for
// an op whose autograd is registered in Python (torch.library.register_autograd), runs that
// Python wrapper even when no gradient is needed: about 3 us before the kernel starts, as much
// as a 1 MiB copy takes. Here the arguments are unpacked in C++ and the op is called through
// the C++ dispatcher with the autograd keys excluded, so it still dispatches by device and
// still shows in the profiler. Two modules:
//   below_autograd (the sample-gating ops): for callers that know no gradient is needed
//     (dynkernels/ops/sample_gating.py under no_grad and inference mode); tensors on any device.
//   cpu_first (the row ops and channel_sparse_conv2d): the public ops' first try, which returns
//     NotImplemented (the caller then takes its usual path) unless every tensor is a plain CPU
//     tensor (the CPU kernels check every argument themselves), no gradient is needed (grad
//     mode off, or no argument requires grad) and the other arguments have the plain types
//     (capacity an int or None; stride, padding, dilation lists of ints; config an int); and
//     gate_summary, the one pass over a CPU call's gates that backend="auto" reads;
//     conv_auto_inputs, what backend="auto" decides a plain float32 CPU call from, in one
//     call; gate_scale_, the pass of its dense execution over the conv's output; and
//     skip_gather / skip_merge, the host path of a plain SkipBlock given its plan.
// Not part of the CMake library (plain Python module code; without it, dynkernels makes the
// same calls through torch.ops).
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu/conv_gemm.h"
#include "cpu/vector_clones.h"
#include "python_calls.h"

namespace {

using at::Tensor;

enum class Mode { below_autograd, cpu_first };

// The tensor arguments of one call, unpacked; `usable` false where cpu_first declines it.
template <Mode mode>
struct Unpacked {
  const char* op;
  bool usable = true;
  bool any_requires_grad = false;

  // Argument i: a torch.Tensor or nn.Parameter (a subclass would skip its __torch_function__
  // here: below_autograd refuses it, cpu_first declines it).
  const Tensor* tensor(PyObject* const* args, int i) {
    if (!THPVariable_CheckExact(args[i])) {
      TORCH_CHECK_TYPE(mode == Mode::cpu_first, op, ": argument ", i, " must be a torch.Tensor, not a subclass");
      usable = false;
      return nullptr;
    }
    const Tensor& t = THPVariable_Unpack(args[i]);
    if (mode == Mode::cpu_first && !t.is_cpu()) usable = false;
    any_requires_grad = any_requires_grad || t.requires_grad();
    return &t;
  }
  std::optional<Tensor> optional_tensor(PyObject* const* args, int i) {
    if (args[i] == Py_None) return std::nullopt;
    const Tensor* t = tensor(args, i);
    return t ? std::optional<Tensor>(*t) : std::nullopt;
  }
  // Whether the call goes ahead (cpu_first: also no gradient needed).
  bool go() const { return usable && (mode == Mode::below_autograd || !(any_requires_grad && c10::GradMode::is_enabled())); }
};

void check_nargs(const char* op, Py_ssize_t nargs, Py_ssize_t want) {
  TORCH_CHECK_TYPE(nargs == want, op, ": takes ", want, " arguments, got ", nargs);
}

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// The registered operator `name`, typed (each caller keeps it in a static: looked up once).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// fn() with the autograd dispatch keys excluded and the GIL released (as torch's own bindings
// run their kernels, so that other Python threads run meanwhile), except for a CPU tensor of at
// most kReleaseBytes: there releasing the GIL and taking it back cost more than the copy (0.7 of
// a 2.4 us gather of 8 x 256 bytes, AMD EPYC, Zen 2).
constexpr int64_t kReleaseBytes = 64 << 10;

template <typename Fn>
auto below_autograd(const Tensor& t, Fn fn) {
  std::optional<pybind11::gil_scoped_release> no_gil;
  if (!t.is_cpu() || t.numel() * static_cast<int64_t>(t.element_size()) > kReleaseBytes) no_gil.emplace();
  at::AutoDispatchBelowAutograd guard;
  return fn();
}

// The row operators through the dispatcher, below autograd.
Tensor call_gather_rows(const Tensor& x, const Tensor& idx, const Tensor& count, int64_t capacity) {
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t);
  static const auto handle = op_handle<Sig>("dynkernels::gather_rows");
  return below_autograd(x, [&] { return handle.call(x, idx, count, capacity); });
}

Tensor call_scatter_rows(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&);
  static const auto handle = op_handle<Sig>("dynkernels::scatter_rows");
  return below_autograd(base, [&] { return handle.call(base, y, idx, count); });
}

// In place into base; its version counter is bumped as torch's own in-place ops do, so that a
// graph that saved base earlier sees the write.
void call_scatter_rows_(const Tensor& base, const Tensor& y, const Tensor& idx, const Tensor& count) {
  using Sig = void(Tensor&, const Tensor&, const Tensor&, const Tensor&);
  static const auto handle = op_handle<Sig>("dynkernels::scatter_rows_");
  Tensor out = base;
  below_autograd(base, [&] { handle.call(out, y, idx, count); });
  if (!out.is_inference()) torch::autograd::impl::bump_version(out);
}

// gather_rows(x, idx, count, capacity): capacity an int (cpu_first: or None, for x's rows).
template <Mode mode>
PyObject* gather_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<mode> a{"gather_rows"};
  check_nargs(a.op, nargs, 4);
  const Tensor *x = a.tensor(args, 0), *idx = a.tensor(args, 1), *count = a.tensor(args, 2);
  if (!a.go()) return not_implemented();
  int64_t capacity;
  if (mode == Mode::cpu_first && args[3] == Py_None) {
    if (x->dim() == 0) return not_implemented();
    capacity = x->size(0);
  } else {
    if (mode == Mode::cpu_first && !PyLong_CheckExact(args[3])) return not_implemented();  // (a bool, say)
    capacity = PyLong_AsLongLong(args[3]);
    if (capacity == -1 && PyErr_Occurred()) return nullptr;
  }
  return THPVariable_Wrap(call_gather_rows(*x, *idx, *count, capacity));
  END_HANDLE_TH_ERRORS
}

// scatter_add_rows(base, y, idx, count, scale): scale a tensor or None.
template <Mode mode>
PyObject* scatter_add_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<mode> a{"scatter_add_rows"};
  check_nargs(a.op, nargs, 5);
  const Tensor *base = a.tensor(args, 0), *y = a.tensor(args, 1), *idx = a.tensor(args, 2), *count = a.tensor(args, 3);
  const std::optional<Tensor> scale = a.optional_tensor(args, 4);
  if (!a.go()) return not_implemented();
  using Sig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&);
  static const auto handle = op_handle<Sig>("dynkernels::scatter_add_rows");
  return THPVariable_Wrap(below_autograd(*base, [&] { return handle.call(*base, *y, *idx, *count, scale); }));
  END_HANDLE_TH_ERRORS
}

// scatter_rows(base, y, idx, count).
template <Mode mode>
PyObject* scatter_rows(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<mode> a{"scatter_rows"};
  check_nargs(a.op, nargs, 4);
  const Tensor *base = a.tensor(args, 0), *y = a.tensor(args, 1), *idx = a.tensor(args, 2), *count = a.tensor(args, 3);
  if (!a.go()) return not_implemented();
  return THPVariable_Wrap(call_scatter_rows(*base, *y, *idx, *count));
  END_HANDLE_TH_ERRORS
}

// scatter_rows_(base, y, idx, count) (below_autograd only): writes y's first count rows into
// base (call_scatter_rows_), returns base.
PyObject* scatter_rows_inplace(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<Mode::below_autograd> a{"scatter_rows_"};
  check_nargs(a.op, nargs, 4);
  const Tensor *base = a.tensor(args, 0), *y = a.tensor(args, 1), *idx = a.tensor(args, 2), *count = a.tensor(args, 3);
  call_scatter_rows_(*base, *y, *idx, *count);
  Py_INCREF(args[0]);
  return args[0];
  END_HANDLE_TH_ERRORS
}

// The rows a RowPlan (dynkernels.nn.skip_plan: the tuple idx, count, rows, kept, n) runs a
// block on, where skip_gather and skip_merge take it: plain CPU index tensors, n samples, some
// but not all of them kept and no padding rows (else the Python path's own cases apply).
struct PlanRows {
  const Tensor *idx = nullptr, *count = nullptr;
  int64_t rows = 0;
};

bool plan_rows(PyObject* plan, int64_t n, PlanRows& out) {
  if (!PyTuple_Check(plan) || PyTuple_GET_SIZE(plan) != 5) return false;
  PyObject *idx = PyTuple_GET_ITEM(plan, 0), *count = PyTuple_GET_ITEM(plan, 1);
  PyObject *rows = PyTuple_GET_ITEM(plan, 2), *kept = PyTuple_GET_ITEM(plan, 3), *samples = PyTuple_GET_ITEM(plan, 4);
  if (!THPVariable_CheckExact(idx) || !THPVariable_CheckExact(count) || !PyLong_CheckExact(rows) ||
      !PyLong_CheckExact(kept) || !PyLong_CheckExact(samples))
    return false;
  out.idx = &THPVariable_Unpack(idx);
  out.count = &THPVariable_Unpack(count);
  out.rows = PyLong_AsLongLong(rows);
  const int64_t k = PyLong_AsLongLong(kept), s = PyLong_AsLongLong(samples);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return out.idx->is_cpu() && out.count->is_cpu() && s == n && out.rows == k && k > 0 && k < n;
}

// skip_gather(x, gate, plan) (cpu_first only): the compact batch of a plain SkipBlock given its
// plan, the forward's checks included, or NotImplemented (the caller then takes its usual path,
// which names any bad argument) unless x and gate are plain CPU tensors, gate [N] floating or
// bool with x's N rows, plan one plan_rows takes, grad mode off and autocast off. With
// skip_merge, the host work of such a block is two calls (SkipBlock.forward's checks,
// run_kept and the merge in Python took twice as long as the block itself on a tiny batch:
// AMD EPYC, Zen 2).
PyObject* skip_gather(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs("skip_gather", nargs, 3);
  if (c10::GradMode::is_enabled() || at::autocast::is_autocast_enabled(at::kCPU)) return not_implemented();
  Unpacked<Mode::cpu_first> a{"skip_gather"};
  const Tensor *x = a.tensor(args, 0), *gate = a.tensor(args, 1);
  if (!a.usable || x->dim() == 0 || gate->dim() != 1 || gate->size(0) != x->size(0) ||
      !(at::isFloatingType(gate->scalar_type()) || gate->scalar_type() == at::kBool))
    return not_implemented();
  PlanRows plan;
  if (!plan_rows(args[2], x->size(0), plan)) return not_implemented();
  return THPVariable_Wrap(call_gather_rows(*x, *plan.idx, *plan.count, plan.rows));
  END_HANDLE_TH_ERRORS
}

// skip_merge(x, y, plan, inplace) (cpu_first only): the block's result y on the compact batch
// merged into x (scatter_rows, or scatter_rows_ into x itself where inplace is True), or
// NotImplemented (the caller then takes its usual merge, which names what does not fit)
// unless y is a plain CPU tensor of x's dtype and row shape with the plan's rows, grad mode is
// off and the plan is one plan_rows takes.
PyObject* skip_merge(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs("skip_merge", nargs, 4);
  if (c10::GradMode::is_enabled()) return not_implemented();
  Unpacked<Mode::cpu_first> a{"skip_merge"};
  const Tensor *x = a.tensor(args, 0), *y = a.tensor(args, 1);
  PlanRows plan;
  if (!a.usable || x->dim() == 0 || !plan_rows(args[2], x->size(0), plan) || y->dim() != x->dim() ||
      y->size(0) != plan.rows || y->sizes().slice(1) != x->sizes().slice(1) || y->scalar_type() != x->scalar_type())
    return not_implemented();
  if (args[3] == Py_True) {
    call_scatter_rows_(*x, *y, *plan.idx, *plan.count);
    Py_INCREF(args[0]);
    return args[0];
  }
  return THPVariable_Wrap(call_scatter_rows(*x, *y, *plan.idx, *plan.count));
  END_HANDLE_TH_ERRORS
}

// A list or tuple of Python ints as int64s into out; false (cpu_first declines) for anything else.
bool int_list(PyObject* obj, std::vector<int64_t>& out) {
  if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    out[i] = PyLong_AsLongLong(items[i]);
    if (out[i] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

// The tensors of a channel_sparse_conv2d call (x, weight, bias, out_gate, in_gate at 0 - 4,
// shift at 8), unpacked by a cpu_first entry (null / empty where `a` declines them).
struct ConvTensors {
  const Tensor *x, *weight, *out_gate;
  std::optional<Tensor> bias, in_gate, shift;
};

ConvTensors conv_tensors(Unpacked<Mode::cpu_first>& a, PyObject* const* args) {
  return {a.tensor(args, 0), a.tensor(args, 1), a.tensor(args, 3), a.optional_tensor(args, 2),
          a.optional_tensor(args, 4), a.optional_tensor(args, 8)};
}

// channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift,
// config) (cpu_first only): bias, in_gate, shift a tensor or None; stride, padding, dilation
// lists of ints. On small layers the Python autograd wrapper that torch.ops runs cost more than
// the convolution's own overhead (8 us of 19 for a 1 x 4 x 4 x 4 input).
PyObject* channel_sparse_conv2d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<Mode::cpu_first> a{"channel_sparse_conv2d"};
  check_nargs(a.op, nargs, 10);
  const auto [x, weight, out_gate, bias, in_gate, shift] = conv_tensors(a, args);
  if (!a.go() || !PyLong_CheckExact(args[9])) return not_implemented();
  std::vector<int64_t> stride, padding, dilation;
  if (!int_list(args[5], stride) || !int_list(args[6], padding) || !int_list(args[7], dilation))
    return not_implemented();
  const int64_t config = PyLong_AsLongLong(args[9]);
  if (config == -1 && PyErr_Occurred()) return nullptr;
  using Sig = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&,
                     const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                     const std::optional<Tensor>&, int64_t);
  static const auto handle = op_handle<Sig>("dynkernels::channel_sparse_conv2d");
  return THPVariable_Wrap(below_autograd(
      *x, [&] { return handle.call(*x, *weight, bias, *out_gate, in_gate, stride, padding, dilation, shift, config); }));
  END_HANDLE_TH_ERRORS
}

// compact(gate, threshold): threshold a float (below_autograd only: the public compact checks
// its gate in Python).
PyObject* compact(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<Mode::below_autograd> a{"compact"};
  check_nargs(a.op, nargs, 2);
  const Tensor* gate = a.tensor(args, 0);
  const double threshold = PyFloat_AsDouble(args[1]);
  if (threshold == -1.0 && PyErr_Occurred()) return nullptr;
  using Sig = std::tuple<Tensor, Tensor>(const Tensor&, double);
  static const auto handle = op_handle<Sig>("dynkernels::compact");
  auto [idx, count] = below_autograd(*gate, [&] { return handle.call(*gate, threshold); });
  PyObject* out = PyTuple_New(2);
  if (out == nullptr) return nullptr;
  PyTuple_SET_ITEM(out, 0, THPVariable_Wrap(std::move(idx)));
  PyTuple_SET_ITEM(out, 1, THPVariable_Wrap(std::move(count)));
  return out;
  END_HANDLE_TH_ERRORS
}

// The min and max of float32 gate entries as they are read (NaN where one is NaN).
struct GateRange {
  float lo, hi;
  bool nan = false;
  explicit GateRange(float first) : lo(first), hi(first) {}
  // g[0:n] folded into the range; returns how many of them are > 0.
  int64_t add(const float* g, int64_t n) {
    int64_t positive = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = g[i];
      positive += v > 0.0f;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      nan = nan || v != v;
    }
    return positive;
  }
  double lowest() const { return nan ? NAN : lo; }
  double highest() const { return nan ? NAN : hi; }
};

// gate_summary(gate) (cpu_first only): (the number of entries > 0, their min, their max) of a
// contiguous float32 CPU tensor with at least one entry, in one pass (min and max NaN where an
// entry is NaN); NotImplemented for any other tensor. backend="auto" reads a CPU call's gates
// with it (dynkernels/ops/_conv_cpu_auto.py): numpy's detach, view and reductions, code that
// nothing else of a call touches, took 0.3 - 0.4 ms of host time per call on a machine whose
// caches lose that code between calls.
PyObject* gate_summary(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs("gate_summary", nargs, 1);
  if (!THPVariable_CheckExact(args[0])) return not_implemented();
  const Tensor& gate = THPVariable_Unpack(args[0]);
  if (!gate.is_cpu() || gate.scalar_type() != at::kFloat || !gate.is_contiguous() || gate.numel() == 0)
    return not_implemented();
  const float* g = gate.const_data_ptr<float>();
  GateRange range(g[0]);
  const long long positive = range.add(g, gate.numel());
  return Py_BuildValue("(Ldd)", positive, range.lowest(), range.highest());
  END_HANDLE_TH_ERRORS
}

// The passes of gate_scale_ over a conv's output, per vector ISA (vector_clones.h): as scalar
// loops with a branch per element, the pass over a 32 x 128 x 16 x 16 channels_last output took
// 6x torch's multiply (AMD EPYC, Zen 5); vectorised it runs at copy speed.
//
// One channels_last pixel: y[c] = g[c] * y[c] (+ t[c]) where g[c] > 0, else 0 (also for a NaN
// gate). The product is formed for every channel and then selected, so that the loop vectorises.
DK_VECTOR_CLONES_UNFUSED
void gate_row(float* __restrict y, const float* __restrict g, const float* __restrict t, int64_t n) {
  if (t) {
    for (int64_t c = 0; c < n; ++c) {
      const float scaled = y[c] * g[c];
      const float v = scaled + t[c];
      y[c] = g[c] > 0.0f ? v : 0.0f;
    }
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float v = y[c] * g[c];
      y[c] = g[c] > 0.0f ? v : 0.0f;
    }
  }
}

// One NCHW plane of a (sample, channel) with gate gv and shift tv.
DK_VECTOR_CLONES_UNFUSED
void gate_plane(float* __restrict y, float gv, float tv, bool shifted, int64_t n) {
  if (!(gv > 0.0f)) {
    std::fill(y, y + n, 0.0f);
  } else if (shifted) {
    for (int64_t i = 0; i < n; ++i) {
      const float scaled = y[i] * gv;
      y[i] = scaled + tv;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] *= gv;
  }
}

// gate_scale_(y, gate, shift) (cpu_first only): the pass of dense execution over its conv's
// output, in place: y[n, c] = gate[n, c] * y[n, c] (+ shift[c]) where gate[n, c] > 0, exactly 0
// elsewhere (also where the gate is NaN); y a float32 CPU tensor [N, C, H, W], contiguous or
// channels_last, gate contiguous float32 [N, C], shift None or contiguous float32 [C]. Returns
// None, or NotImplemented for any other arguments or where autograd records (the caller then
// runs its torch ops). One pass where torch's ops take a multiply, a fill of the inactive gates
// and a write of zeros, each with its own host work after a conv that leaves the caches cold.
PyObject* gate_scale(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  check_nargs("gate_scale_", nargs, 3);
  if (!THPVariable_CheckExact(args[0]) || !THPVariable_CheckExact(args[1])) return not_implemented();
  if (args[2] != Py_None && !THPVariable_CheckExact(args[2])) return not_implemented();
  const Tensor& y = THPVariable_Unpack(args[0]);
  const Tensor& gate = THPVariable_Unpack(args[1]);
  const bool channels_last = !y.is_contiguous() && y.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto plain_float = [](const Tensor& t) { return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(); };
  if (y.dim() != 4 || !y.is_cpu() || y.scalar_type() != at::kFloat || !(y.is_contiguous() || channels_last) ||
      !plain_float(gate) || gate.dim() != 2 || gate.size(0) != y.size(0) || gate.size(1) != y.size(1))
    return not_implemented();
  const Tensor* shift = args[2] == Py_None ? nullptr : &THPVariable_Unpack(args[2]);
  if (shift && (!plain_float(*shift) || shift->dim() != 1 || shift->size(0) != y.size(1))) return not_implemented();
  if (c10::GradMode::is_enabled() && (y.requires_grad() || gate.requires_grad() || (shift && shift->requires_grad())))
    return not_implemented();
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  float* out = y.mutable_data_ptr<float>();
  const float* g = gate.const_data_ptr<float>();
  const float* t = shift ? shift->const_data_ptr<float>() : nullptr;
  {
    pybind11::gil_scoped_release no_gil;
    if (channels_last) {  // rows of C channels, one per pixel
      at::parallel_for(0, N * HW, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) gate_row(out + r * C, g + (r / HW) * C, t, C);
      });
    } else {  // planes of HW pixels, one per (sample, channel)
      at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) gate_plane(out + p * HW, g[p], t ? t[p % C] : 0.0f, t != nullptr, HW);
      });
    }
  }
  if (!y.is_inference()) torch::autograd::impl::bump_version(y);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// A conv argument (stride, padding, dilation) as the Python check takes it: an int (not a bool)
// or a list or tuple of two, each >= minimum; false for anything else.
bool int_pair(PyObject* obj, int64_t minimum, int64_t out[2]) {
  std::vector<int64_t> v;
  if (PyLong_CheckExact(obj)) {
    v.assign(2, PyLong_AsLongLong(obj));
    if (v[0] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  } else if (!int_list(obj, v) || v.size() != 2) {
    return false;
  }
  out[0] = v[0], out[1] = v[1];
  return v[0] >= minimum && v[1] >= minimum;
}

// conv_auto_inputs(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift)
// (cpu_first only): what backend="auto" decides from on CPU tensors, read in one call, or
// NotImplemented (the caller then takes its Python path, whose checks name any bad argument)
// unless every argument is one the Python checks accept and of the common kind: plain float32
// CPU tensors (x 4-d, weight [Cout, Cin, kh, kw], bias and shift None or [Cout], out_gate
// [N, Cout] and in_gate None or [N, Cin] contiguous with at least one entry), stride, padding
// and dilation ints or pairs (>= 1, >= 0, >= 1) that leave an output, no gradient needed and
// no autocast. Returns (channels_last, stride, padding, dilation, (Ho, Wo), the FLOP density
// (the mean over samples of active outputs x active inputs over Cout x Cin), the lane density
// (the same with active outputs and Cout rounded up to whole vectors of cpu_conv::kFloatLanes: the
// work of the kernel where they fill its vector lanes), the min and the max of out_gate (NaN
// where one is NaN), whether every input is active). The Python path
// after a conv, which leaves the interpreter's data out of the caches, cost about 0.25 ms of
// host time at 2 threads on the 32 x 128 -> 128 3x3 16x16 layer (AMD EPYC, Zen 4).
PyObject* conv_auto_inputs(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  Unpacked<Mode::cpu_first> a{"conv_auto_inputs"};
  check_nargs(a.op, nargs, 9);
  const auto [x, weight, out_gate, bias, in_gate, shift] = conv_tensors(a, args);
  if (!a.go() || at::autocast::is_autocast_enabled(at::kCPU)) return not_implemented();
  const auto f32 = [](const Tensor& t) { return t.scalar_type() == at::kFloat; };
  if (!f32(*x) || x->dim() != 4 || !f32(*weight) || weight->dim() != 4 || weight->size(1) != x->size(1))
    return not_implemented();
  const int64_t N = x->size(0), Cin = x->size(1), Cout = weight->size(0);
  const auto per_channel = [&](const std::optional<Tensor>& t) {
    return !t || (f32(*t) && t->dim() == 1 && t->size(0) == Cout);
  };
  const auto gate_of = [&](const Tensor& g, int64_t channels) {
    return f32(g) && g.is_contiguous() && g.dim() == 2 && g.size(0) == N && g.size(1) == channels && g.numel() > 0;
  };
  if (!per_channel(bias) || !per_channel(shift) || !gate_of(*out_gate, Cout) || (in_gate && !gate_of(*in_gate, Cin)))
    return not_implemented();
  int64_t stride[2], padding[2], dilation[2], out_hw[2];
  if (!int_pair(args[5], 1, stride) || !int_pair(args[6], 0, padding) || !int_pair(args[7], 1, dilation))
    return not_implemented();
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = x->size(2 + d) + 2 * padding[d] - dilation[d] * (weight->size(2 + d) - 1);
    if (extent < 1) return not_implemented();
    out_hw[d] = (extent - 1) / stride[d] + 1;
  }
  // The gates: active counts per sample, out_gate's min and max.
  const float* og = out_gate->const_data_ptr<float>();
  const float* ig = in_gate ? in_gate->const_data_ptr<float>() : nullptr;
  GateRange range(og[0]);
  bool in_all = true;
  double active_pairs = 0.0, lane_pairs = 0.0;
  constexpr int64_t L = dynkernels::cpu_conv::kFloatLanes;
  const auto whole_vectors = [](int64_t c) { return (c + L - 1) / L * L; };
  for (int64_t n = 0; n < N; ++n) {
    const int64_t outs = range.add(og + n * Cout, Cout);
    int64_t ins = Cin;
    if (ig) {
      ins = 0;
      for (int64_t c = 0; c < Cin; ++c) ins += ig[n * Cin + c] > 0.0f;
      in_all = in_all && ins == Cin;
    }
    active_pairs += static_cast<double>(outs) * static_cast<double>(ins);
    lane_pairs += static_cast<double>(whole_vectors(outs)) * static_cast<double>(ins);
  }
  const bool channels_last = !x->is_contiguous() && x->is_contiguous(at::MemoryFormat::ChannelsLast);
  const double density = active_pairs / (static_cast<double>(N) * Cout * Cin);
  const double lane_density = lane_pairs / (static_cast<double>(N) * whole_vectors(Cout) * Cin);
  return Py_BuildValue("(O(LL)(LL)(LL)(LL)ddddO)", channels_last ? Py_True : Py_False, stride[0], stride[1], padding[0],
                       padding[1], dilation[0], dilation[1], out_hw[0], out_hw[1], density, lane_density, range.lowest(),
                       range.highest(), in_all ? Py_True : Py_False);
  END_HANDLE_TH_ERRORS
}

template <typename Fn>
PyCFunction fastcall(Fn fn) {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn));
}

PyMethodDef below_autograd_methods[] = {
    {"gather_rows", fastcall(gather_rows<Mode::below_autograd>), METH_FASTCALL, "gather_rows(x, idx, count, capacity)"},
    {"scatter_add_rows", fastcall(scatter_add_rows<Mode::below_autograd>), METH_FASTCALL,
     "scatter_add_rows(base, y, idx, count, scale)"},
    {"scatter_rows", fastcall(scatter_rows<Mode::below_autograd>), METH_FASTCALL, "scatter_rows(base, y, idx, count)"},
    {"scatter_rows_", fastcall(scatter_rows_inplace), METH_FASTCALL, "scatter_rows_(base, y, idx, count): returns base"},
    {"compact", fastcall(compact), METH_FASTCALL, "compact(gate, threshold)"},
    {nullptr, nullptr, 0, nullptr}};

PyMethodDef cpu_first_methods[] = {
    {"gather_rows", fastcall(gather_rows<Mode::cpu_first>), METH_FASTCALL, "gather_rows(x, idx, count, capacity)"},
    {"scatter_add_rows", fastcall(scatter_add_rows<Mode::cpu_first>), METH_FASTCALL,
     "scatter_add_rows(base, y, idx, count, scale)"},
    {"scatter_rows", fastcall(scatter_rows<Mode::cpu_first>), METH_FASTCALL, "scatter_rows(base, y, idx, count)"},
    {"channel_sparse_conv2d", fastcall(channel_sparse_conv2d), METH_FASTCALL,
     "channel_sparse_conv2d(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift, config)"},
    {"conv_auto_inputs", fastcall(conv_auto_inputs), METH_FASTCALL,
     "conv_auto_inputs(x, weight, bias, out_gate, in_gate, stride, padding, dilation, shift): what backend='auto' "
     "decides from on CPU tensors, or NotImplemented"},
    {"gate_scale_", fastcall(gate_scale), METH_FASTCALL,
     "gate_scale_(y, gate, shift): dense execution's gate pass over a float32 CPU conv output, in place"},
    {"gate_summary", fastcall(gate_summary), METH_FASTCALL,
     "gate_summary(gate): (entries > 0, min, max) of a contiguous float32 CPU tensor, else NotImplemented"},
    {"skip_gather", fastcall(skip_gather), METH_FASTCALL,
     "skip_gather(x, gate, plan): a plain SkipBlock's compact batch from its RowPlan, checked, else NotImplemented"},
    {"skip_merge", fastcall(skip_merge), METH_FASTCALL,
     "skip_merge(x, y, plan, inplace): a plain SkipBlock's merge of its block's result, else NotImplemented"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef below_autograd_module = {
    PyModuleDef_HEAD_INIT, "below_autograd",
    "The sample-gating operators called below autograd, on any device, for calls that need no gradient.", -1,
    below_autograd_methods};

PyModuleDef cpu_first_module = {
    PyModuleDef_HEAD_INIT, "cpu_first",
    "The row operators and channel_sparse_conv2d on plain CPU tensors where no gradient is needed, else NotImplemented.",
    -1,
    cpu_first_methods};

}  // namespace

int dynkernels_add_call_modules(PyObject* module) {
  for (PyModuleDef* def : {&below_autograd_module, &cpu_first_module}) {
    PyObject* sub = PyModule_Create(def);
    if (sub == nullptr || PyModule_AddObject(module, def->m_name, sub) != 0) {
      Py_XDECREF(sub);
      return -1;
    }
  }
  return 0;
}
