// The upg_backend._core module: thin wrappers, numpy in and out, the GIL released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>

#include "cpu/backend.h"
#include "metal/backend.h"
#include "upg/bandwidth.h"
#include "upg/batch.h"
#include "upg/format.h"
#include "upg/model.h"
#include "upg/sampler.h"
#include "upg/session.h"

namespace py = pybind11;
using namespace upg;

void bind_backend(py::module_& m);
#ifdef UPG_CUDA
void bind_cuda(py::module_& m);
int cuda_device_count();
#endif
void bind_kernels(py::module_& m);
void bind_metal(py::module_& m);

namespace {

// A read-only numpy view of bytes inside the mapping, keeping `owner` (the mapping) alive.
py::array readonly_view(const py::dtype& dtype, std::vector<py::ssize_t> shape, const void* ptr, py::handle owner) {
  py::array a(dtype, std::move(shape), ptr, owner);
  a.attr("setflags")(py::arg("write") = false);
  return a;
}

// One session is not safe to use from two threads at once; the lock makes that an orderly wait.
struct PySession {
  // On `backend`: a Backend (the CPU's when None), or a Metal Gpu (the device, or the tests' harness).
  PySession(std::shared_ptr<Model> m, int n_ctx, const std::string& kv, int n_threads, int n_batch,
            py::object backend)
      : model(m), session(m, make_backend(backend, n_threads), n_ctx, kv_type(kv), n_batch) {}
  static std::shared_ptr<Backend> make_backend(py::object b, int n_threads) {
    if (b.is_none()) return std::make_shared<CpuBackend>(n_threads);
    if (py::isinstance<metal::Gpu>(b)) return std::make_shared<metal::MetalBackend>(b.cast<std::shared_ptr<metal::Gpu>>());
    if (py::isinstance<Backend>(b)) return b.cast<std::shared_ptr<Backend>>();
    throw std::invalid_argument("backend must be None, a _core.Backend or a _core.MetalGpu");
  }
  static KVType kv_type(const std::string& s) {
    if (s == "f16") return KVType::F16;
    if (s == "f32") return KVType::F32;
    throw std::invalid_argument("kv_type must be 'f16' or 'f32', got '" + s + "'");
  }
  std::shared_ptr<Model> model;
  Session session;
  Rng rng{0};
  std::mutex mu;
};

// The slots' sequences and a sampler state (RNG) per slot; one step at a time (the lock).
struct PyBatch {
  PyBatch(std::shared_ptr<Model> m, int n_slots, int n_ctx, const std::string& kv, int n_threads, int n_batch,
          py::object backend)
      : model(m),
        batch(m, PySession::make_backend(backend, n_threads), n_slots, n_ctx, PySession::kv_type(kv), n_batch),
        rngs(size_t(n_slots), Rng(0)), rng_mu(new std::mutex[size_t(n_slots)]) {}
  Rng& rng(int slot) {
    check(slot);
    return rngs[size_t(slot)];
  }
  std::mutex& sampler_mu(int slot) {
    check(slot);
    return rng_mu[size_t(slot)];
  }
  void check(int slot) const {
    if (slot < 0 || slot >= batch.n_slots()) throw std::invalid_argument("no such slot");
  }
  std::shared_ptr<Model> model;
  BatchSession batch;
  std::vector<Rng> rngs;
  // Sampling locks its slot's generator only, not the batch: a request samples its token while the
  // next step runs (waiting for `mu` there held a slot out of that step).
  std::unique_ptr<std::mutex[]> rng_mu;
  std::mutex mu;
  // The slots of the step that holds `mu` (or waits for it): truncating another slot changes only
  // that slot's length, so it does not wait for the step (a request starting while 15 others decode).
  std::mutex stepping_mu;
  std::vector<int> stepping = std::vector<int>(size_t(batch.n_slots()), 0);  // steps holding each slot
  void mark(const std::vector<BatchSession::Entry>& es, int delta) {
    std::lock_guard<std::mutex> lock(stepping_mu);
    for (const auto& e : es)
      if (e.slot >= 0 && e.slot < batch.n_slots()) stepping[size_t(e.slot)] += delta;
  }
};

using Tokens = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

int32_t sample_checked(const Model& model, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                       const SamplingParams& p, Tokens history, Rng& rng, std::mutex& mu) {
  const int32_t vocab = model.config().vocab_size;
  if (logits.ndim() != 1 || logits.shape(0) != vocab) throw std::invalid_argument("logits must be a 1-D array of n_vocab floats");
  if (history.ndim() != 1) throw std::invalid_argument("history must be a 1-D array");
  py::gil_scoped_release nogil;
  std::lock_guard<std::mutex> lock(mu);
  return sample_token(logits.data(), vocab, p, history.data(), history.shape(0), rng);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "upg-backend C++ core: UPG reader, Phi3 engine, sampler and CPU kernels";
  py::register_exception<FormatError>(m, "UPGFormatError", PyExc_ValueError);
  bind_backend(m);

  py::class_<UPGFile, std::shared_ptr<UPGFile>>(m, "File")
      .def(py::init<const std::string&>(), py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("header", [](const UPGFile& f) { return py::bytes(f.header()).attr("decode")("utf-8"); })
      .def_property_readonly("file_size", &UPGFile::file_size)
      .def_property_readonly("data_offset", &UPGFile::data_offset)
      .def_property_readonly("tensors", [](const UPGFile& f) {
        py::list out;
        for (const auto& t : f.tensors()) {
          py::dict d;
          d["name"] = t.name;
          d["dtype"] = dtype_name(t.dtype);
          d["dims"] = py::tuple(py::cast(t.dims));
          d["block"] = t.block;
          d["offset"] = t.offset;
          d["nbytes"] = t.nbytes;
          d["crc32"] = t.crc32;
          out.append(d);
        }
        return out;
      })
      .def("data", [](py::object self, const std::string& name) {
        const UPGFile& f = self.cast<const UPGFile&>();
        const TensorInfo* t = f.find(name);
        if (!t) throw py::key_error("no tensor named '" + name + "'");
        return readonly_view(py::dtype::of<uint8_t>(), {py::ssize_t(t->nbytes)}, f.data(*t), self);
      }, py::arg("name"))
      .def("verify", &UPGFile::verify, py::call_guard<py::gil_scoped_release>());

  py::class_<ModelConfig>(m, "ModelConfig", "The engine's flat model config (cpp/upg/model.h); "
                          "upg_backend.config.ModelConfig.engine_config() fills it.")
      .def(py::init<>())
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_hidden_layers", &ModelConfig::num_hidden_layers)
      .def_readwrite("num_attention_heads", &ModelConfig::num_attention_heads)
      .def_readwrite("num_key_value_heads", &ModelConfig::num_key_value_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("rotary_dim", &ModelConfig::rotary_dim)
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &ModelConfig::rope_theta)
      .def_readwrite("longrope", &ModelConfig::longrope)
      .def_readwrite("original_max_position_embeddings", &ModelConfig::original_max_position_embeddings)
      .def_readwrite("short_factor", &ModelConfig::short_factor)
      .def_readwrite("long_factor", &ModelConfig::long_factor)
      .def_readwrite("attention_factor", &ModelConfig::attention_factor)
      .def_readwrite("tie_word_embeddings", &ModelConfig::tie_word_embeddings)
      .def("check", &ModelConfig::check, "Raises ValueError naming the first bad field.");

  py::class_<Model, std::shared_ptr<Model>>(m, "Model")
      .def(py::init([](const std::string& path, const ModelConfig& c) {
             py::gil_scoped_release nogil;
             return std::make_shared<Model>(path, c);
           }), py::arg("path"), py::arg("config"))
      .def_property_readonly("n_vocab", [](const Model& m) { return m.config().vocab_size; });

  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("temperature", &SamplingParams::temperature)
      .def_readwrite("top_k", &SamplingParams::top_k)
      .def_readwrite("top_p", &SamplingParams::top_p)
      .def_readwrite("min_p", &SamplingParams::min_p)
      .def_readwrite("typical_p", &SamplingParams::typical_p)
      .def_readwrite("repeat_penalty", &SamplingParams::repeat_penalty)
      .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_readwrite("penalty_last_n", &SamplingParams::penalty_last_n)
      .def_property("logit_bias",
          [](const SamplingParams& p) {
            py::dict d;
            for (const auto& [k, v] : p.logit_bias) d[py::int_(k)] = v;
            return d;
          },
          [](SamplingParams& p, const py::dict& d) {
            p.logit_bias.clear();
            for (const auto& [k, v] : d) p.logit_bias.emplace_back(k.cast<int32_t>(), v.cast<float>());
          });

  py::class_<PySession>(m, "Session")
      .def(py::init<std::shared_ptr<Model>, int, const std::string&, int, int, py::object>(),
           py::arg("model"), py::arg("n_ctx"), py::arg("kv_type") = "f16", py::arg("n_threads") = 0,
           py::arg("n_batch") = 512, py::arg("backend") = py::none(),
           py::keep_alive<1, 7>())  // a Python MetalGpu must outlive its Python half's use here
      .def_property_readonly("backend", [](PySession& s) { return s.session.backend().name(); })
      .def("eval", [](PySession& s, Tokens tokens, bool logits_all, py::object generated) {
             if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
             const int64_t n = tokens.shape(0);
             const bool gen = generated.is_none() ? n == 1 : generated.cast<bool>();
             const int64_t vocab = s.model->config().vocab_size;
             py::array_t<float> out(std::vector<py::ssize_t>{logits_all ? n : 1, vocab});
             const int32_t* tp = tokens.data();
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lock(s.mu);
               s.session.eval(tp, n, logits_all, op, gen);
             }
             return out;
           }, py::arg("tokens"), py::arg("logits_all") = false, py::arg("generated") = py::none(),
           "generated: the tokens were sampled (decode arithmetic), else given (prompt arithmetic); None: "
           "a single token is generated")
      .def("eval_hidden", [](PySession& s, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens) {
             if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
             const int64_t n = tokens.shape(0);
             py::array_t<float> out(std::vector<py::ssize_t>{n, s.model->config().hidden_size});
             const int32_t* tp = tokens.data();
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lock(s.mu);
               s.session.eval_hidden(tp, n, op);
             }
             return out;
           }, py::arg("tokens"))
      .def("decode_greedy", [](PySession& s, int32_t token, int64_t n) {
             if (n < 1) throw std::invalid_argument("decode_greedy needs n >= 1");
             py::array_t<int32_t> out(n);
             int32_t* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lock(s.mu);
               s.session.decode_greedy(token, n, op);
             }
             return out;
           }, py::arg("token"), py::arg("n"),
           "Appends `token` and n - 1 greedy tokens after it on the backend; returns the n argmaxes "
           "(the first maximum of each position's logits; the last is not appended).")
      .def_property_readonly("n_past", [](PySession& s) { return s.session.n_past(); })
      .def_property_readonly("n_ctx", [](PySession& s) { return s.session.n_ctx(); })
      .def("truncate", [](PySession& s, int64_t n) {
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(s.mu);
             s.session.truncate(n);
           }, py::arg("n"))
      .def("save_kv", [](PySession& s) {
             std::vector<uint8_t> kv;
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lock(s.mu);
               kv = s.session.save_kv();
             }
             return py::array_t<uint8_t>(py::ssize_t(kv.size()), kv.data());
           }, "The KV cache of positions [0, n_past) as bytes.")
      .def("load_kv", [](PySession& s, int64_t n_past, py::array_t<uint8_t, py::array::c_style | py::array::forcecast> kv) {
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(s.mu);
             s.session.load_kv(n_past, kv.data(), size_t(kv.size()));
           }, py::arg("n_past"), py::arg("kv"))
      .def("set_seed", [](PySession& s, uint64_t seed) { s.rng = Rng(seed); }, py::arg("seed"))
      .def("sample", [](PySession& s, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                        const SamplingParams& p, Tokens history) {
             return sample_checked(*s.model, logits, p, history, s.rng, s.mu);
           }, py::arg("logits"), py::arg("params"), py::arg("history"))
      .def("eval_sample", [](PySession& s, int32_t token, const SamplingParams& p, Tokens history) {
             if (history.ndim() != 1) throw std::invalid_argument("history must be a 1-D array");
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(s.mu);
             return s.session.eval_sample(token, p, history.data(), history.shape(0), s.rng);
           }, py::arg("token"), py::arg("params"), py::arg("history"),
           "eval([token]) (a generated token) and sample(its logits, params, history) in one call; only the "
           "candidates leave the backend when the cut fits its top_k (1 <= top_k <= MAX_TOP_K, or greedy). "
           "history: the tokens the penalties look at, ending with `token`.")
      .def("last_logits", [](PySession& s) {
             py::array_t<float> out(s.model->config().vocab_size);
             float* op = out.mutable_data();
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(s.mu);
             s.session.last_logits(op);
             return out;
           }, "The logits of the token eval_sample evaluated last, float32 [n_vocab].");

  py::class_<PyBatch>(m, "BatchSession", "n_slots sequences evaluated together (cpp/upg/batch.h).")
      .def(py::init<std::shared_ptr<Model>, int, int, const std::string&, int, int, py::object>(),
           py::arg("model"), py::arg("n_slots"), py::arg("n_ctx"), py::arg("kv_type") = "f16", py::arg("n_threads") = 0,
           py::arg("n_batch") = 512, py::arg("backend") = py::none(), py::keep_alive<1, 8>())
      .def_property_readonly("backend", [](PyBatch& b) { return b.batch.backend().name(); })
      .def_property_readonly("n_slots", [](PyBatch& b) { return b.batch.n_slots(); })
      .def_property_readonly("n_ctx", [](PyBatch& b) { return b.batch.n_ctx(); })
      .def_property_readonly("n_batch", [](PyBatch& b) { return b.batch.n_batch(); })
      .def("step", [](PyBatch& b, const std::vector<std::tuple<int, Tokens, bool, int>>& entries, py::object ids) {
             std::vector<BatchSession::Entry> es;
             for (const auto& [slot, tokens, generated, logits] : entries) {
               if (tokens.ndim() != 1) throw std::invalid_argument("tokens must be a 1-D array");
               if (logits < 0 || logits > 3)
                 throw std::invalid_argument("logits must be 0 (none), 1 (last), 2 (all) or 3 (the last token's argmax)");
               es.push_back({slot, tokens.data(), int(tokens.shape(0)), generated, BatchSession::Logits(logits)});
             }
             const int64_t n_logits = BatchSession::logit_rows(es), n_ids = BatchSession::argmax_count(es);
             int32_t* idp = nullptr;
             if (n_ids > 0) {
               if (!py::isinstance<py::array_t<int32_t>>(ids))
                 throw std::invalid_argument("argmax entries (logits 3) need ids: an int32 array of one element each");
               auto arr = ids.cast<py::array_t<int32_t>>();
               if (arr.ndim() != 1 || arr.shape(0) != n_ids || !arr.writeable() ||
                   !(arr.flags() & py::array::c_style))
                 throw std::invalid_argument("ids must be a writable contiguous int32 array of " + std::to_string(n_ids) +
                                             " elements (one per argmax entry)");
               idp = arr.mutable_data();
             }
             py::array_t<float> out(std::vector<py::ssize_t>{py::ssize_t(n_logits), b.model->config().vocab_size});
             float* op = out.mutable_data();
             {
               py::gil_scoped_release nogil;
               struct Stepping {  // the entries' slots are the step's until it returns or throws
                 PyBatch& b;
                 const std::vector<BatchSession::Entry>& es;
                 ~Stepping() { b.mark(es, -1); }
               } held{b, es};
               b.mark(es, 1);
               std::lock_guard<std::mutex> lock(b.mu);
               b.batch.step(es, op, idp);
             }
             return out;
           }, py::arg("entries"), py::arg("ids") = py::none(),
           "One pass over [(slot, tokens int32[n], generated, logits: 0 none, 1 last token, 2 every token, "
           "3 the last token's argmax)]: the logits asked for, [rows, n_vocab], entry after entry; the argmax "
           "entries' token ids (the first maximum, computed on the backend) into ids, entry after entry.")
      .def("n_past", [](PyBatch& b, int slot) { return b.batch.n_past(slot); }, py::arg("slot"))
      .def("truncate", [](PyBatch& b, int slot, int64_t n) {
             b.check(slot);
             py::gil_scoped_release nogil;  // a step may hold mu: the other threads run meanwhile
             {
               std::lock_guard<std::mutex> lock(b.stepping_mu);  // no step takes the slot meanwhile
               if (!b.stepping[size_t(slot)]) return b.batch.truncate(slot, n);
             }
             std::lock_guard<std::mutex> lock(b.mu);
             b.batch.truncate(slot, n);
           }, py::arg("slot"), py::arg("n"))
      .def("copy_prefix", [](PyBatch& b, int src, int dst, int64_t n) {
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(b.mu);
             b.batch.copy_prefix(src, dst, n);
           }, py::arg("src"), py::arg("dst"), py::arg("n"))
      .def("set_seed", [](PyBatch& b, int slot, uint64_t seed) {
             Rng& rng = b.rng(slot);
             py::gil_scoped_release nogil;
             std::lock_guard<std::mutex> lock(b.sampler_mu(slot));
             rng = Rng(seed);
           }, py::arg("slot"), py::arg("seed"))
      .def("sample", [](PyBatch& b, int slot, py::array_t<float, py::array::c_style | py::array::forcecast> logits,
                        const SamplingParams& p, Tokens history) {
             return sample_checked(*b.model, logits, p, history, b.rng(slot), b.sampler_mu(slot));
           }, py::arg("slot"), py::arg("logits"), py::arg("params"), py::arg("history"));

  m.attr("MAX_TOP_K") = Backend::kMaxTopK;
  m.def("sample_token", [](py::array_t<float, py::array::c_style | py::array::forcecast> logits, const SamplingParams& p,
                           Tokens history, uint64_t seed) {
        if (logits.ndim() != 1 || logits.shape(0) < 1) throw std::invalid_argument("logits must be a non-empty 1-D array");
        if (history.ndim() != 1) throw std::invalid_argument("history must be a 1-D array");
        Rng rng(seed);
        return sample_token(logits.data(), int32_t(logits.shape(0)), p, history.data(), history.shape(0), rng);
      }, py::arg("logits"), py::arg("params"), py::arg("history"), py::arg("seed"),
      "The host sampler's pick from a whole row, with a generator of this seed (the tests' reference).");

  m.def("measure_read_bandwidth", &measure_read_bandwidth, py::arg("bytes") = uint64_t(1) << 30,
        py::arg("n_threads") = 0, py::arg("reps") = 5, py::call_guard<py::gil_scoped_release>(),
        "Best memory read rate in GB/s over a buffer of `bytes` read by n_threads threads (0: all cores).");

  // The format's constants and types, for the Python writer and reader (one definition: C++'s).
  py::dict dtypes;
  for (int t = 0; t < kNumDTypes; ++t) dtypes[dtype_name(DType(t))] = t;
  m.attr("DTYPES") = dtypes;
  py::list quantized;
  for (int t = 0; t < kNumDTypes; ++t)
    if (is_quantized(DType(t))) quantized.append(dtype_name(DType(t)));
  m.attr("QUANTIZED_TYPES") = py::tuple(quantized);
  py::dict versions;
  for (int t = 0; t < kNumDTypes; ++t) versions[dtype_name(DType(t))] = dtype_version(DType(t));
  m.attr("DTYPE_VERSIONS") = versions;
  m.attr("MAGIC") = py::bytes(reinterpret_cast<const char*>(kMagic), sizeof(kMagic));
  m.attr("FORMAT_VERSION") = kVersion;
  m.attr("PREAMBLE_SIZE") = kPreambleSize;
  m.attr("TENSOR_ALIGN") = kTensorAlign;
  m.attr("DATA_ALIGN") = kDataAlign;
  m.def("quant_nbytes", [](const std::string& type, uint64_t rows, uint64_t cols, uint64_t block) {
        for (int t = 0; t < kNumDTypes; ++t)
          if (type == dtype_name(DType(t)) && is_quantized(DType(t))) {
            if (const char* e = quant_shape_error(DType(t), cols, int(block)))
              throw std::invalid_argument(type + " [" + std::to_string(rows) + ", " + std::to_string(cols) + "] block " +
                                    std::to_string(block) + ": " + e);
            return quant_sections(DType(t), rows, cols, block).total();
          }
        throw std::invalid_argument("not a quantized type: '" + type + "'");
      }, py::arg("type"), py::arg("rows"), py::arg("cols"), py::arg("block"),
      "Bytes of a quantized [rows, cols] matrix, its padded sections together (FORMAT.md).");

  m.def("backends", [] {
        std::vector<std::string> names{"cpu"};
#ifdef UPG_METAL
        names.push_back("metal");  // whether the GPU opens is found when it is opened
#endif
#ifdef UPG_CUDA
        if (cuda_device_count() > 0) names.push_back("cuda");
#endif
        return names;
      }, "The backends this build has and this machine can run, fastest last.");

  bind_kernels(m);
  bind_metal(m);
#ifdef UPG_CUDA
  bind_cuda(m);
#endif
}
