// csrc/python_calls.cpp: adds the submodules below_autograd and cpu_first to dynkernels._C;
// 0, or -1 with a Python error set.
#pragma once

#include <Python.h>

int dynkernels_add_call_modules(PyObject* module);
