// The CUDA backend in Python (builds with UPG_CUDA only): _core.CudaBackend(device), which a
// Session runs on, _core.cuda_device_count(), its memory and the read-bandwidth probe.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "cuda/backend.h"

namespace py = pybind11;

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

void bind_cuda(py::module_& m) {
  using namespace pybind11::literals;
  using upg::cuda::CudaBackend;
  using upg::cuda::Generated;
  py::class_<CudaBackend, upg::Backend, std::shared_ptr<CudaBackend>>(m, "CudaBackend")
      .def(py::init([](int device, const std::string& generated) {
             if (generated != "matvec" && generated != "matmul")
               throw py::value_error("generated must be 'matvec' or 'matmul', got '" + generated + "'");
             return std::make_shared<CudaBackend>(device, generated == "matvec" ? Generated::kMatvec : Generated::kMatmul);
           }),
           "device"_a = 0, "generated"_a = "matvec",
           "The CUDA backend on GPU `device` (RuntimeError when there is none). generated: the kernels of "
           "generated tokens' linear layers: 'matvec' (fastest for one stream) or 'matmul' (the prompt "
           "rows' tensor-core mat-mul: fastest for many streams in a BatchSession).")
      .def_property_readonly("generated",
                             [](const CudaBackend& b) { return b.generated() == Generated::kMatvec ? "matvec" : "matmul"; })
      .def_property_readonly("passes", &CudaBackend::passes)
      .def_property_readonly("replays", &CudaBackend::replays, "Passes that replayed the previous pass's CUDA graph.")
      .def_property_readonly("device_bytes", &CudaBackend::device_bytes,
                             "Bytes of device memory the backend holds: weights (counted by each backend that "
                             "shares one copy of them), buffers, workspace.");
  m.def("cuda_device_count", &cuda_device_count, "NVIDIA GPUs the CUDA runtime sees (0 when none or no driver).");
  m.def(
      "cuda_memory",
      [](int device) {
        size_t free = 0, total = 0;
        if (cudaSetDevice(device) != cudaSuccess || cudaMemGetInfo(&free, &total) != cudaSuccess)
          throw std::runtime_error("cuda: no GPU " + std::to_string(device));
        return py::make_tuple(free, total);
      },
      "device"_a = 0, "(free, total) bytes of GPU `device`'s memory, as the driver counts them.");
  m.def(
      "cuda_read_bandwidth",
      [](size_t bytes, int device) {
        if (cudaSetDevice(device) != cudaSuccess) throw std::runtime_error("cuda: no GPU " + std::to_string(device));
        return upg::cuda::read_bandwidth(bytes);
      },
      "bytes"_a = size_t(4) << 30, "device"_a = 0,
      "GB/s of one streaming read over `bytes` of GPU memory (median of 10 passes): the decode floor.");
}
