// The Python module dynkernels._C. Importing it runs the TORCH_LIBRARY registrations in
// the other translation units; its functions say which CUDA version (if any) the CUDA kernels
// were compiled with, so that import can check it against torch, which tile configurations the
// CUDA channel_sparse_conv2d kernel offers, which micro-kernel the CPU channel-sparse conv runs
// on this CPU, and a byte compare of two buffers; its submodules below_autograd and cpu_first
// call the sample-gating operators without autograd (csrc/python_calls.cpp).
// Not part of the CMake library, which is loaded with torch.ops.load_library instead.
#include <Python.h>

#include <cstring>

#include "python_calls.h"

#ifdef WITH_CUDA
#include "cuda/channel_sparse_conv2d_tiles.h"

int dynkernels_cuda_version();  // csrc/cuda/cuda_version.cu
#endif

namespace dynkernels::cpu_conv {
const char* gemm_isa();  // csrc/cpu/conv_gemm.cpp
}

static PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  return PyLong_FromLong(dynkernels_cuda_version());
#else
  return PyLong_FromLong(-1);
#endif
}

// [{"id": 0, "BM": 128, "BN": 128, "BK": 32, "stages": 4, "warps": 8, ...}, ...]: one dict per
// value of channel_sparse_conv2d's `config` argument; [] without CUDA kernels.
static PyObject* cuda_conv_configs(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
#ifdef WITH_CUDA
  using namespace dynkernels::conv_tiles;
  for (int id = 0; id < kNumTileConfigs; ++id) {
    const TileConfig& c = kTileConfigs[id];
    PyObject* d = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "id", id, "BM", c.bm, "BN", c.bn, "BK", c.bk,
                                "stages", c.stages, "warps", c.warps_m * c.warps_n, "warps_m", c.warps_m,
                                "warps_n", c.warps_n, "smem_bytes", smem_bytes(c, 2));
    if (d == nullptr || PyList_Append(list, d) != 0) {
      Py_XDECREF(d);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(d);
  }
#endif
  return list;
}

static PyObject* cpu_conv_isa(PyObject*, PyObject*) { return PyUnicode_FromString(dynkernels::cpu_conv::gemm_isa()); }

// same_bytes(a, b): whether two C-contiguous buffers (e.g. numpy views of CPU tensors) hold the
// same bytes; a memcmp, without the temporary that numpy's or torch's elementwise compare
// writes (dynkernels/ops/_cpu_packed_conv.py checks a cached weight with it on every call).
static PyObject* same_bytes(PyObject*, PyObject* args) {
  Py_buffer a, b;
  if (!PyArg_ParseTuple(args, "y*y*", &a, &b)) return nullptr;
  int equal = a.len == b.len;
  if (equal) {
    Py_BEGIN_ALLOW_THREADS equal = std::memcmp(a.buf, b.buf, static_cast<size_t>(a.len)) == 0;
    Py_END_ALLOW_THREADS
  }
  PyBuffer_Release(&a);
  PyBuffer_Release(&b);
  return PyBool_FromLong(equal);
}

static PyMethodDef methods[] = {
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."},
    {"cuda_conv_configs", cuda_conv_configs, METH_NOARGS,
     "Tile configurations of the CUDA channel_sparse_conv2d kernel, one dict per `config` id: BM output channels x "
     "BN output pixels per thread block, BK reduction elements per pipeline stage, the number of stages, warps "
     "(warps_m x warps_n) and the shared memory per block (fp16/bf16). config=-1 picks by layer shape: BM 64 for "
     "Cout <= 64, else 128; BN 64 for Ho*Wo <= 64, else 128. fp32 input runs one CUDA-core configuration "
     "(64 x 64 x 32, 3 stages) whatever the id. [] in a build without CUDA kernels."},
    {"cpu_conv_isa", cpu_conv_isa, METH_NOARGS,
     "Micro-kernel of the CPU channel_sparse_conv2d on this CPU: 'avx512', 'avx2' or 'portable' (follows "
     "torch's CPU capability, which ATEN_CPU_CAPABILITY lowers)."},
    {"same_bytes", same_bytes, METH_VARARGS,
     "same_bytes(a, b): whether two C-contiguous buffers have the same length and bytes (a memcmp)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dynkernels compiled kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && dynkernels_add_call_modules(m) != 0) Py_CLEAR(m);
  return m;
}
