// The Python module laudnet_ops._C is empty on purpose: importing it loads this
// shared library, whose static initialisers register every op with the
// dispatcher (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other files).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "laudnet_ops compiled kernels (registered with torch.library)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
