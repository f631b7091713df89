// _core.metal_plan: the launches of one Metal forward pass (cpp/metal/graph.h), recorded instead
// of run, so that tests run them on the CPU harness and compare the logits with the CPU engine.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/graph.h"
#include "upg/model.h"

namespace py = pybind11;

namespace {

struct Recorder : upg::metal::Encoder {
  std::vector<upg::metal::Launch> launches;
  void dispatch(const upg::metal::Launch& l) override { launches.push_back(l); }
};

py::dict metal_plan(const std::shared_ptr<upg::Model>& model, int n_ctx, int n_batch, const std::string& kv_type,
                    int n, int n_past, bool all_logits) {
  if (kv_type != "f16" && kv_type != "f32") throw py::value_error("kv_type must be 'f16' or 'f32'");
  Recorder rec;
  upg::metal::Ops ops(rec);
  const upg::metal::Graph graph(*model, n_ctx, n_batch, kv_type == "f16");
  try {
    graph.forward(ops, n, n_past, all_logits);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
  py::list launches;
  for (const auto& l : rec.launches) {
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
    launches.append(d);
  }
  py::dict out;
  out["buffer_sizes"] = graph.buffer_sizes();
  out["rope_factors"] = graph.rope_factors();
  out["launches"] = launches;
  return out;
}

}  // namespace

void bind_metal(py::module_& m) {
  using namespace pybind11::literals;
  m.def("metal_plan", &metal_plan, "model"_a, "n_ctx"_a, "n_batch"_a, "kv_type"_a, "n"_a, "n_past"_a,
        "all_logits"_a,
        "The Metal backend's launches for one forward pass of n tokens at n_past (graph.h), as dicts: "
        "kernel, buffers [(index, buffer id, offset)], args (bytes) at args_index, tgmem, groups, "
        "threads; with buffer_sizes by id (Graph::BufferId order) and rope_factors.");
}
