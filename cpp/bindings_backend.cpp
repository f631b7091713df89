// The backend seam in Python (cpp/upg/backend.h): buffers, matrices and every op of a Backend,
// so the tests run each op on each backend against the numpy references (tests/test_backend_ops.py).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "cpu/backend.h"
#include "upg/backend.h"
#include "upg/session.h"  // sample_row

namespace py = pybind11;
using namespace upg;

namespace {

using Bytes = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using Ids = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

DType dtype_by_name(const std::string& name) {
  for (int t = 0; t < kNumDTypes; ++t)
    if (name == dtype_name(DType(t))) return DType(t);
  throw std::invalid_argument("unknown type '" + name + "'");
}

}  // namespace

void bind_backend(py::module_& m) {
  using namespace pybind11::literals;
  py::class_<Buf>(m, "Buf", "A range of one backend buffer: its id and a byte offset.")
      .def(py::init<int, uint64_t>(), "id"_a, "offset"_a = 0)
      .def_readonly("id", &Buf::id)
      .def_readonly("offset", &Buf::offset)
      .def("at", &Buf::at, "bytes"_a);
  py::class_<Matrix>(m, "Matrix", "A weight matrix inside a backend buffer (type name, block, shape, data, outliers).")
      .def(py::init([](const std::string& type, int block, int64_t rows, int64_t cols, Buf data, Buf rowptr, Buf col,
                       Buf val) {
             return Matrix{dtype_by_name(type), block, rows, cols, data, rowptr, col, val};
           }), "type"_a, "block"_a, "rows"_a, "cols"_a, "data"_a, "rowptr"_a = Buf{}, "col"_a = Buf{}, "val"_a = Buf{});
  py::class_<UpgRopeArgs>(m, "RopeArgs")
      .def(py::init([](int n_tokens, int n_heads, int head_dim, int rot_dims, int token_stride, float attn_factor) {
             return UpgRopeArgs{n_tokens, n_heads, head_dim, rot_dims, token_stride, attn_factor};
           }), "n_tokens"_a, "n_heads"_a, "head_dim"_a, "rot_dims"_a, "token_stride"_a, "attn_factor"_a = 1.0f);
  py::class_<UpgAttnArgs>(m, "AttnArgs")
      .def(py::init([](int n_heads, int n_kv_heads, int head_dim, int kv_stride, int q_stride, int n_tokens, float scale,
                       int n_decode, int n_seqs, int slot_len) {
             return UpgAttnArgs{n_heads, n_kv_heads, head_dim, kv_stride, q_stride, n_tokens, scale, n_decode, n_seqs,
                                slot_len > 0 ? slot_len : kv_stride};
           }), "n_heads"_a, "n_kv_heads"_a, "head_dim"_a, "kv_stride"_a, "q_stride"_a, "n_tokens"_a, "scale"_a,
           "n_decode"_a = 0, "n_seqs"_a = 1, "slot_len"_a = 0,
           "The pass's shape (n_decode, n_seqs, slot_len: 0 for kv_stride) as the graph passes it (upg_common.h).");

  py::class_<Backend, std::shared_ptr<Backend>>(m, "Backend", "What a Session runs on (cpp/upg/backend.h).")
      .def_property_readonly("name", &Backend::name)
      .def("alloc", &Backend::alloc, "nbytes"_a, "A zero-filled buffer.")
      .def("upload", [](Backend& b, Buf dst, Bytes src) { b.upload(dst, src.data(), size_t(src.size())); }, "dst"_a, "src"_a)
      .def("download", [](Backend& b, Buf src, size_t nbytes) {
             py::array_t<uint8_t> out{py::ssize_t(nbytes)};
             b.download(out.mutable_data(), src, nbytes);
             return out;
           }, "src"_a, "nbytes"_a)
      .def("begin", &Backend::begin, "pass_"_a, "Begins a pass whose UpgPass and UpgSeq entries (int32 fields, upg_common.h) are in pass_.")
      .def("end", &Backend::end)
      .def("get_rows", &Backend::get_rows, "w"_a, "ids"_a, "n_tokens"_a, "out"_a)
      .def("rms_norm", &Backend::rms_norm, "x"_a, "weight"_a, "out"_a, "n_tokens"_a, "n"_a, "eps"_a)
      .def("linear", [](Backend& b, const Matrix& w, Buf x, int n_tokens, Buf y, int n_decode) {
             b.linear(w, x, n_tokens, n_decode < 0 ? int(n_tokens == 1) : n_decode, y);
           }, "w"_a, "x"_a, "n_tokens"_a, "y"_a, "n_decode"_a = -1,
           "n_decode: rows that are generated tokens (-1: 1 for a single row, else 0)")
      .def("rope", &Backend::rope, "qkv"_a, "inv_freq"_a, "args"_a)
      .def("kv_store", &Backend::kv_store, "qkv"_a, "k_cache"_a, "v_cache"_a, "f16"_a, "args"_a)
      .def("attention", &Backend::attention, "qkv"_a, "k_cache"_a, "v_cache"_a, "out"_a, "f16"_a, "args"_a)
      .def("silu_mul", &Backend::silu_mul, "gate_up"_a, "out"_a, "n_tokens"_a, "n"_a)
      .def("add", &Backend::add, "x"_a, "y"_a, "n"_a)
      .def("norm_linear", &Backend::norm_linear, "x"_a, "weight"_a, "eps"_a, "xn"_a, "w"_a, "n_tokens"_a, "n_decode"_a,
           "y"_a, "y = linear(w, rms_norm(x, weight)); xn: scratch for the normed rows.")
      .def("linear_add", &Backend::linear_add, "w"_a, "x"_a, "n_tokens"_a, "n_decode"_a, "tmp"_a, "out"_a,
           "out += linear(w, x); tmp: scratch for the product.")
      .def("silu_linear_add", &Backend::silu_linear_add, "w"_a, "gate_up"_a, "n_tokens"_a, "n_decode"_a, "act"_a,
           "tmp"_a, "out"_a, "out += linear(w, silu_mul(gate_up)); act, tmp: scratch.")
      .def("argmax", &Backend::argmax, "x"_a, "n"_a, "out"_a)
      .def("next_token", &Backend::next_token, "pass_"_a, "tokens"_a, "out"_a)
      .def("top_k", [](Backend& b, Buf logits, int n, int k, Ids skip) {
             if (skip.ndim() != 1) throw std::invalid_argument("skip must be a 1-D array");
             std::vector<Candidate> top(size_t(std::max(k, 0)));
             py::array_t<float> skipped{skip.shape(0)};
             b.top_k(logits, n, k, skip.data(), int(skip.shape(0)), top.data(), skipped.mutable_data());
             py::array_t<int32_t> ids{py::ssize_t(top.size())};
             py::array_t<float> values{py::ssize_t(top.size())};
             for (size_t i = 0; i < top.size(); ++i) ids.mutable_data()[i] = top[i].id, values.mutable_data()[i] = top[i].logit;
             return py::make_tuple(ids, values, skipped);
           }, "logits"_a, "n"_a, "k"_a, "skip"_a,
           "The sampler's cut of n floats: (ids int32 [k], -1 past the last; their floats; the skip ids' floats).")
      .def("sample", [](Backend& b, Buf logits, int n, const SamplingParams& p, Ids history, uint64_t seed) {
             if (history.ndim() != 1) throw std::invalid_argument("history must be a 1-D array");
             if (n < 1) throw std::invalid_argument("sample: the row is empty");
             Rng rng(seed);
             return sample_row(b, logits, n, p, history.data(), history.shape(0), rng);
           }, "logits"_a, "n"_a, "params"_a, "history"_a, "seed"_a,
           "A Session's pick from n logits on the backend (sample_row), with a generator of this seed.");
  py::class_<CpuBackend, Backend, std::shared_ptr<CpuBackend>>(m, "CpuBackend")
      .def(py::init<int>(), "n_threads"_a = 0, "The CPU kernels on n_threads threads (0: all cores).")
      .def("collect_column_squares", &CpuBackend::collect_column_squares, "on"_a,
           "While on, linear() sums the square of every input column, per weight matrix (calibration).")
      .def("column_squares", [](const CpuBackend& b) {
             py::dict out;  // data-section offset of the matrix -> (sums float64 [cols], rows)
             for (const auto& [offset, c] : b.column_squares()) {
               py::array_t<double> sum{py::ssize_t(c.sum.size())};
               std::copy(c.sum.begin(), c.sum.end(), sum.mutable_data());
               out[py::int_(offset)] = py::make_tuple(sum, c.rows);
             }
             return out;
           }, "{data-section offset of a matrix: (sum of squares per input column, float64 [cols], input rows)}.")
      .def("clear_column_squares", &CpuBackend::clear_column_squares)
      .def("capture_inputs", &CpuBackend::capture_inputs, "offsets"_a,
           "Keep the float32 inputs of the matrices at these data-section offsets (GPTQ's Gram matrices); [] stops.")
      .def("take_inputs", [](CpuBackend& b) {
             py::dict out;  // data-section offset of the matrix -> float32 [n_tokens, cols]
             for (auto& [offset, in] : b.take_inputs()) {
               py::array_t<float> x({py::ssize_t(in.x.size() / size_t(in.cols)), py::ssize_t(in.cols)});
               std::copy(in.x.begin(), in.x.end(), x.mutable_data());
               out[py::int_(offset)] = x;
             }
             return out;
           }, "{data-section offset of a matrix: its inputs since the last call, float32 [n_tokens, cols]}.");
}
