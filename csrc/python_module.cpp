// The Python module dynkernels._C. Importing it runs the TORCH_LIBRARY registrations in
// the other translation units; its one function says which CUDA version (if any) the
// CUDA kernels were compiled with, so that import can check it against torch.
// Not part of the CMake library, which is loaded with torch.ops.load_library instead.
#include <Python.h>

#ifdef WITH_CUDA
int dynkernels_cuda_version();  // csrc/cuda/cuda_version.cu
#endif

static PyObject* cuda_version(PyObject*, PyObject*) {
#ifdef WITH_CUDA
  return PyLong_FromLong(dynkernels_cuda_version());
#else
  return PyLong_FromLong(-1);
#endif
}

static PyMethodDef methods[] = {
    {"cuda_version", cuda_version, METH_NOARGS,
     "CUDART_VERSION the CUDA kernels were compiled with (e.g. 13000), or -1 for a CPU-only build."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dynkernels compiled kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
