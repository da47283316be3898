// The Python module laudnet_ops._C: importing it loads this shared library,
// whose static initialisers register every op with the dispatcher
// (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other files). Its only
// Python functions are the tensor-core and experimental-kernel switches, which are
// process state rather than ops (laudnet_ops.set_tensor_cores and friends wrap them).
//
// Only Python's stable ABI is used, so one build, _C.abi3.so, loads in every later
// Python; the kernels never touch Python. Recent torch passes Py_LIMITED_API itself.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x03090000
#endif
#include <Python.h>

#include <c10/util/Exception.h>

#include <exception>

#include "cudnn_composites.h"
#include "tensor_core_switch.h"

namespace {

PyObject* py_tensor_cores_built(PyObject*, PyObject*) {
  return PyBool_FromLong(laudnet_ops::tensor_cores_built());
}

PyObject* py_tensor_cores_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(laudnet_ops::tensor_cores_enabled());
}

PyObject* py_tensor_core_calls(PyObject*, PyObject*) {
  return PyLong_FromLongLong(laudnet_ops::tensor_core_calls());
}

PyObject* py_set_tensor_cores(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  try {
    laudnet_ops::set_tensor_cores(on != 0);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* py_experimental_kernels_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(laudnet_ops::experimental_kernels_enabled());
}

PyObject* py_set_experimental_kernels(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  laudnet_ops::set_experimental_kernels(on != 0);
  Py_RETURN_NONE;
}

PyObject* py_cudnn_composites_enabled(PyObject*, PyObject*) {
  return PyBool_FromLong(laudnet_ops::cudnn_composites_enabled());
}

PyObject* py_set_cudnn_composites(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  laudnet_ops::set_cudnn_composites(on != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"tensor_cores_built", py_tensor_cores_built, METH_NOARGS, "Whether the tensor-core kernels were built."},
    {"tensor_cores_enabled", py_tensor_cores_enabled, METH_NOARGS, "Whether the tensor-core kernels are on."},
    {"set_tensor_cores", py_set_tensor_cores, METH_O, "Turn the tensor-core kernels on or off."},
    {"tensor_core_calls", py_tensor_core_calls, METH_NOARGS, "Number of op calls that ran on tensor cores."},
    {"experimental_kernels_enabled", py_experimental_kernels_enabled, METH_NOARGS,
     "Whether CUDA paths not yet run on a GPU are taken."},
    {"set_experimental_kernels", py_set_experimental_kernels, METH_O,
     "Turn the CUDA paths not yet run on a GPU on or off."},
    {"cudnn_composites_enabled", py_cudnn_composites_enabled, METH_NOARGS,
     "Whether every CUDA convolution op call runs through its cuDNN composite."},
    {"set_cudnn_composites", py_set_cudnn_composites, METH_O,
     "Send every CUDA convolution op call through its cuDNN composite, or not."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "laudnet_ops compiled kernels (registered with torch.library)",
      -1, methods};
  return PyModule_Create(&module_def);
}
}
