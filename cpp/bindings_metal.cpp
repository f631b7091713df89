// The Metal backend in Python: _core.MetalGpu is the GPU interface the Metal backend runs on
// (cpp/metal/backend.h), subclassed in Python by the tests over the CPU harness;
// _core.metal_device() is the real one, in builds for Apple only. _core.Session(..., backend=gpu)
// makes a session on it (bindings.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/backend.h"
#ifdef UPG_METAL
#include "metal/metal_backend.h"
#endif

namespace py = pybind11;

namespace {

using upg::Buf;
using upg::metal::Gpu;
using upg::metal::Launch;

py::dict launch_dict(const Launch& l) {
  py::list buffers;
  for (const auto& [index, buf] : l.buffers) buffers.append(py::make_tuple(index, buf.id, buf.offset));
  py::dict d;
  d["kernel"] = l.kernel;
  d["buffers"] = buffers;
  d["args_index"] = l.args_index;
  d["args"] = py::bytes(reinterpret_cast<const char*>(l.args.data()), l.args.size());
  d["tgmem"] = l.tgmem;
  d["groups"] = py::make_tuple(l.groups[0], l.groups[1], l.groups[2]);
  d["threads"] = l.threads;
  return d;
}

// Gpu's methods implemented by a Python subclass (addresses as ints, launches as dicts).
struct PyGpu : Gpu {
  py::function method(const char* name) const {
    py::function f = py::get_override(static_cast<const Gpu*>(this), name);
    if (!f) throw std::runtime_error(std::string("MetalGpu subclass lacks ") + name);
    return f;
  }
  Buf wrap(const void* data, size_t bytes) override {
    py::gil_scoped_acquire gil;
    return method("wrap")(reinterpret_cast<uintptr_t>(data), bytes).cast<Buf>();
  }
  Buf alloc(size_t bytes) override {
    py::gil_scoped_acquire gil;
    return method("alloc")(bytes).cast<Buf>();
  }
  void* contents(Buf b) override {
    py::gil_scoped_acquire gil;
    return reinterpret_cast<void*>(method("contents")(b).cast<uintptr_t>());
  }
  void begin() override {
    py::gil_scoped_acquire gil;
    method("begin")();
  }
  void end() override {
    py::gil_scoped_acquire gil;
    method("end")();
  }
  void dispatch(const Launch& l) override {
    py::gil_scoped_acquire gil;
    method("dispatch")(launch_dict(l));
  }
};

}  // namespace

void bind_metal(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<Gpu, PyGpu, std::shared_ptr<Gpu>>(m, "MetalGpu",
      "What a Metal session runs on. Subclasses implement wrap(address, nbytes) and alloc(nbytes) -> "
      "Buf, contents(buf) -> address, begin(), end() and dispatch(launch: dict of kernel, buffers "
      "[(index, buffer id, offset)], args_index, args (bytes), tgmem, groups, threads).")
      .def(py::init<>());
  py::class_<upg::metal::MetalBackend, upg::Backend, std::shared_ptr<upg::metal::MetalBackend>>(m, "MetalBackend")
      .def(py::init<std::shared_ptr<Gpu>>(), "gpu"_a, "The Metal backend on a MetalGpu (the device, or the tests' harness).",
           py::keep_alive<1, 2>());
#ifdef UPG_METAL
  m.def("metal_device", [](const std::string& metallib, const std::string& source_dir) {
        return std::shared_ptr<Gpu>(upg::metal::Device::open(metallib, source_dir));
      }, "metallib"_a, "source_dir"_a, "The system's Metal GPU with the kernels loaded (Apple builds only).");
#endif
}
