// The Python module dynkernels._C. Importing it runs the TORCH_LIBRARY registrations in
// the other translation units; cuda_version says which CUDA version (if any) the CUDA kernels
// were compiled with, so that import can check it against torch; cpu_conv_isa which
// micro-kernel the CPU channel-sparse conv runs on this CPU.
// Not part of the CMake library, which is loaded with torch.ops.load_library instead.
#include <Python.h>

#ifdef WITH_CUDA
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

static PyObject* cpu_conv_isa(PyObject*, PyObject*) { return PyUnicode_FromString(dynkernels::cpu_conv::gemm_isa()); }

static PyMethodDef methods[] = {
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."},
    {"cpu_conv_isa", cpu_conv_isa, METH_NOARGS,
     "Micro-kernel of the CPU channel_sparse_conv2d on this CPU: 'avx512', 'avx2' or 'portable' (follows "
     "torch's CPU capability, which ATEN_CPU_CAPABILITY lowers)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dynkernels compiled kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
