// The schemas of every resnet_fast op. Implementations register for their dispatch keys in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake kernels and autograd are added in Python
// (resnet_fast/ops/<op>.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import resnet_fast._C` loads this library, which runs the registrations below. The module
// itself holds nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(resnet_fast, m) {
  // Option-A shortcut (see csrc/common/zero_pad_shortcut.h).
  m.def("zero_pad_shortcut(Tensor x, int out_channels, int stride) -> Tensor");
  m.def("zero_pad_shortcut_backward(Tensor grad_out, SymInt[] input_size, int stride) -> Tensor");
}
