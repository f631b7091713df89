// The CUDA backend in Python (builds with UPG_CUDA only): _core.CudaBackend(device), which a
// Session runs on, and _core.cuda_device_count().
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <memory>

#include "cuda/backend.h"

namespace py = pybind11;

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

void bind_cuda(py::module_& m) {
  using namespace pybind11::literals;
  using upg::cuda::CudaBackend;
  py::class_<CudaBackend, upg::Backend, std::shared_ptr<CudaBackend>>(m, "CudaBackend")
      .def(py::init<int>(), "device"_a = 0, "The CUDA backend on GPU `device` (RuntimeError when there is none).")
      .def_property_readonly("passes", &CudaBackend::passes)
      .def_property_readonly("replays", &CudaBackend::replays, "Passes that replayed the previous pass's CUDA graph.");
  m.def("cuda_device_count", &cuda_device_count, "NVIDIA GPUs the CUDA runtime sees (0 when none or no driver).");
}
