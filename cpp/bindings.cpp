// placeholder: the engine bindings land here
#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_kernels(py::module_& m);
PYBIND11_MODULE(_core, m) {
  bind_kernels(m);
}
