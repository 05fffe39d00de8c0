// The Python module shell of eagle_fast._C / eagle_fast._C_cuda: importing it runs the static
// TORCH_LIBRARY registrations of the kernels linked into the same library. No pybind11 needed.
#include <Python.h>

#ifndef EF_MODULE_NAME
#define EF_MODULE_NAME _C
#endif
#define EF_CAT(a, b) a##b
#define EF_INIT(name) EF_CAT(PyInit_, name)
#define EF_STR2(x) #x
#define EF_STR(x) EF_STR2(x)

extern "C" PyMODINIT_FUNC EF_INIT(EF_MODULE_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, EF_STR(EF_MODULE_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
