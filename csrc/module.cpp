// Python module entry point of kvpo_kernels._C: importing it runs the TORCH_LIBRARY
// registrations of the other translation units. The CMake build leaves this file out and makes a
// plain shared library for torch.ops.load_library.
#include <Python.h>

static struct PyModuleDef kvpo_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kvpo_module); }
