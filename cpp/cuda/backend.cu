#include "backend.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>

#include "common.cuh"  // check()

namespace upg::cuda {
namespace {

// Argument bytes for a pass's signature: scalars, pointers and the padding-free argument structs
// of upg_common.h as they are; a Weight field by field (it has padding).
template <typename T>
void append(std::string& sig, const T& v) {
  sig.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void append(std::string& sig, const Weight& w) {
  append(sig, w.dtype);
  append(sig, w.args);
  append(sig, w.data);
  append(sig, w.rowptr);
  append(sig, w.col);
  append(sig, w.val);
}

// Device memory freed with its last holder.
std::shared_ptr<void> device_alloc(int device, size_t bytes) {
  void* p = nullptr;
  check(cudaMalloc(&p, bytes ? bytes : 1), "cudaMalloc");  // 256-byte aligned
  return std::shared_ptr<void>(p, [device](void* q) {
    cudaSetDevice(device);
    cudaFree(q);
  });
}

// One device copy of each content on each GPU, shared by its backends (a server's Llama and its
// BatchSession on one card would otherwise hold the weights twice); freed with the last of them.
std::shared_ptr<void> shared_weights(int device, const void* data, size_t bytes, uint64_t content,
                                     cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::tuple<int, uint64_t, size_t>, std::weak_ptr<void>> copies;
  std::lock_guard<std::mutex> lock(mu);  // a second loader of the same content waits for the first's copy
  for (auto it = copies.begin(); it != copies.end();) it = it->second.expired() ? copies.erase(it) : std::next(it);
  std::weak_ptr<void>& entry = copies[{device, content, bytes}];
  if (std::shared_ptr<void> held = entry.lock()) return held;
  std::shared_ptr<void> copy = device_alloc(device, bytes);
  check(cudaMemcpyAsync(copy.get(), data, bytes, cudaMemcpyHostToDevice, stream), "upload the weights");
  check(cudaStreamSynchronize(stream), "upload the weights");
  entry = copy;
  return copy;
}

}  // namespace

CudaBackend::CudaBackend(int device, Generated generated) : device_(device), generated_(generated) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count)
    throw std::runtime_error("cuda: no GPU " + std::to_string(device) + " (" + std::to_string(count) + " found)");
  check(cudaSetDevice(device), "cudaSetDevice");
  init(device);
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (graph_) cudaGraphExecDestroy(graph_);
  base_.clear();
  if (stream_) cudaStreamDestroy(stream_);
}

Buf CudaBackend::weights(const void* data, size_t bytes, uint64_t content) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  base_.push_back(shared_weights(device_, data, bytes, content, stream_));
  device_bytes_ += bytes;
  return Buf{int(base_.size() - 1), 0};
}

Buf CudaBackend::alloc(size_t bytes) {
  check(cudaSetDevice(device_), "cudaSetDevice");
  base_.push_back(device_alloc(device_, bytes));
  check(cudaMemset(base_.back().get(), 0, bytes), "cudaMemset");
  device_bytes_ += bytes;
  return Buf{int(base_.size() - 1), 0};
}

void CudaBackend::upload(Buf dst, const void* src, size_t bytes) {
  check(cudaMemcpyAsync(ptr(dst), src, bytes, cudaMemcpyHostToDevice, stream_), "upload");
  check(cudaStreamSynchronize(stream_), "upload");  // src may go away once this returns
}

void CudaBackend::download(void* dst, Buf src, size_t bytes) {
  check(cudaMemcpyAsync(dst, ptr(src), bytes, cudaMemcpyDeviceToHost, stream_), "download");
  check(cudaStreamSynchronize(stream_), "download");
}

void CudaBackend::begin(Buf pass) {
  pass_ = ptr<int32_t>(pass);
  ops_.clear();
  signature_.clear();
  workspace_need_ = 0;
}

void CudaBackend::end() {
  ++passes_;
  workspace_.need(workspace_need_);          // growing waits for the queued passes that may still read the old one
  append(signature_, workspace_.get());  // the launches read it when captured
  if (graph_ && signature_ == graph_signature_) {
    ++replays_;
  } else {
    cudaGraph_t g = nullptr;
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture");
    try {
      for (const auto& op : ops_) op();
    } catch (...) {
      cudaStreamEndCapture(stream_, &g);
      if (g) cudaGraphDestroy(g);
      throw;
    }
    check(cudaStreamEndCapture(stream_, &g), "end capture");
    if (graph_) cudaGraphExecDestroy(graph_), graph_ = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&graph_, g, 0);
    cudaGraphDestroy(g);
    check(e, "instantiate the pass's graph");
    graph_signature_ = signature_;
  }
  check(cudaGraphLaunch(graph_, stream_), "launch the pass's graph");
  // No wait: upload and download synchronize the stream, so passes queue back to back.
}

template <typename... A>
void CudaBackend::record(const char* op, std::function<void()> launch, const A&... args) {
  signature_ += op;
  (append(signature_, args), ...);
  ops_.push_back(std::move(launch));
}

Weight CudaBackend::weight(const Matrix& m, int n_tokens) const {
  const bool outliers = m.has_outliers();
  return make_weight(int(m.type), int(m.rows), int(m.cols), m.block, ptr(m.data), n_tokens,
                     outliers ? ptr<const int32_t>(m.rowptr) : nullptr, outliers ? ptr<const int32_t>(m.col) : nullptr,
                     outliers ? ptr<const uint16_t>(m.val) : nullptr);
}

void CudaBackend::get_rows(const Matrix& m, Buf ids, int n_tokens, Buf out) {
  const Weight w = weight(m, n_tokens);
  const int32_t* id = ptr<const int32_t>(ids);
  float* o = ptr<float>(out);
  const int32_t* pass = pass_;
  record("get_rows", [=, s = stream_] { cuda::get_rows(w, id, o, pass, s); }, w, id, o, pass);
}

void CudaBackend::rms_norm(Buf x, Buf weight_buf, Buf out, int n_tokens, int n, float eps) {
  const float *xp = ptr<const float>(x), *wp = ptr<const float>(weight_buf);
  float* o = ptr<float>(out);
  const UpgNormArgs a{n, eps};
  const int32_t* pass = pass_;
  record("rms_norm", [=, s = stream_] { cuda::rms_norm(xp, wp, o, a, n_tokens, false, pass, s); }, xp, wp, o, a,
         n_tokens, pass);
}

void CudaBackend::linear(const Matrix& m, Buf x, int n_tokens, int n_decode, Buf y) {
  if (n_decode < 0 || n_decode > n_tokens) throw std::invalid_argument("cuda linear: n_decode outside the call's rows");
  const float* xp = ptr<const float>(x);
  float* yp = ptr<float>(y);
  const int32_t* pass = pass_;
  // Generated rows: the mat-vec, each row's sums those of the token alone, or with the prompt rows
  // (Generated::kMatmul); prompt rows: the mat-mat kernel, however few (batch invariance: a row's
  // kernel depends on its kind only; the mat-mat's sums do not depend on its token tile).
  const int n_vec = generated_ == Generated::kMatvec ? n_decode : 0;
  if (n_vec > 0) {
    const Weight w = weight(m, 1);
    if (n_vec == 1) record("matvec", [=, s = stream_] { cuda::matvec(w, xp, yp, s); }, w, xp, yp);
    else record("matvec_n", [=, s = stream_] { cuda::matvec_n(w, xp, yp, n_vec, s); }, w, xp, yp, n_vec);
  }
  const int n_mat = n_tokens - n_vec;
  if (n_mat == 0) return;
  const Weight w = weight(m, n_mat);
  const float* xr = xp + int64_t(n_vec) * m.cols;
  float* yr = yp + int64_t(n_vec) * m.rows;
  void* const* ws = workspace(matmul_scratch(w));  // the rounded x of quantized weights
  record("matmul", [=, s = stream_] { cuda::matmul(w, xr, yr, pass, s, *ws); }, w, xr, yr, pass);
}

void* const* CudaBackend::workspace(size_t bytes) {
  workspace_need_ = std::max(workspace_need_, bytes);
  return workspace_.address();
}

void CudaBackend::rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& a) {
  float* q = ptr<float>(qkv);
  const float* f = ptr<const float>(inv_freq);
  const int32_t* pass = pass_;
  record("rope", [=, s = stream_] { cuda::rope(q, f, a, pass, s); }, q, f, a, pass);
}

void CudaBackend::kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& a) {
  const float* q = ptr<const float>(qkv);
  void *k = ptr(k_cache), *v = ptr(v_cache);
  const int32_t* pass = pass_;
  record("kv_store", [=, s = stream_] { cuda::kv_store(q, k, v, f16, a, pass, s); }, q, k, v, f16, a, pass);
}

void CudaBackend::attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& a) {
  const float* q = ptr<const float>(qkv);
  const void *k = ptr(k_cache), *v = ptr(v_cache);
  float* o = ptr<float>(out);
  const int32_t* pass = pass_;
  // Generated tokens: flash-decoding over splits of each one's positions, merged through the
  // workspace; prompt tokens: flash attention in tiles of one sequence each.
  if (a.n_decode > 0) {
    void* const* ws = workspace(decode_splits(a).workspace);
    record("attention_decode",
           [=, s = stream_] { cuda::attention_decode(q, k, v, o, f16, a, static_cast<float*>(*ws), pass, s); },
           q, k, v, o, f16, a, pass);
  }
  if (a.n_tokens > a.n_decode)
    record("attention_prefill", [=, s = stream_] { cuda::attention_prefill(q, k, v, o, f16, a, pass, s); },
           q, k, v, o, f16, a, pass);
}

void CudaBackend::silu_mul(Buf gate_up, Buf out, int n_tokens, int n) {
  const float* g = ptr<const float>(gate_up);
  float* o = ptr<float>(out);
  const UpgEltArgs a{n, n_tokens, 2 * n};
  const int32_t* pass = pass_;
  record("silu_mul", [=, s = stream_] { cuda::silu_mul(g, o, a, pass, s); }, g, o, a, pass);
}

void CudaBackend::add(Buf x, Buf y, int n) {
  float* xp = ptr<float>(x);
  const float* yp = ptr<const float>(y);
  const UpgEltArgs a{n, 1, 0};  // one row of all n floats (the kernel's rows are tokens)
  const int32_t* pass = pass_;
  record("add", [=, s = stream_] { cuda::add(xp, yp, a, pass, s); }, xp, yp, a, pass);
}

void CudaBackend::record_fused_matvec(const char* op, const Matrix& m, Buf x, Buf y, const MatvecFuse& f) {
  const Weight w = weight(m, 1);
  const float* xp = ptr<const float>(x);
  float* yp = ptr<float>(y);
  record(op, [=, s = stream_] { cuda::matvec(w, xp, yp, s, f); }, w, xp, yp, f.norm_weight, f.eps, f.silu_mul, f.accumulate);
}

void CudaBackend::norm_linear(Buf x, Buf weight_buf, float eps, Buf xn, const Matrix& w, int n_tokens, int n_decode, Buf y) {
  if (!fuses(n_tokens, n_decode)) return Backend::norm_linear(x, weight_buf, eps, xn, w, n_tokens, n_decode, y);
  MatvecFuse f;
  f.norm_weight = ptr<const float>(weight_buf);
  f.eps = eps;
  record_fused_matvec("matvec_norm", w, x, y, f);
}

void CudaBackend::linear_add(const Matrix& w, Buf in, int n_tokens, int n_decode, Buf tmp, Buf x) {
  if (!fuses(n_tokens, n_decode)) return Backend::linear_add(w, in, n_tokens, n_decode, tmp, x);
  MatvecFuse f;
  f.accumulate = true;
  record_fused_matvec("matvec_add", w, in, x, f);
}

void CudaBackend::silu_linear_add(const Matrix& w, Buf gate_up, int n_tokens, int n_decode, Buf act, Buf tmp, Buf x) {
  if (!fuses(n_tokens, n_decode)) return Backend::silu_linear_add(w, gate_up, n_tokens, n_decode, act, tmp, x);
  MatvecFuse f;
  f.silu_mul = true;
  f.accumulate = true;
  record_fused_matvec("matvec_silu_add", w, gate_up, x, f);
}

void CudaBackend::argmax(Buf x, int n, Buf out) {
  const float* xp = ptr<const float>(x);
  int32_t* o = ptr<int32_t>(out);
  record("argmax", [=, s = stream_] { cuda::argmax(xp, n, o, s); }, xp, n, o);
}

void CudaBackend::next_token(Buf pass, Buf tokens, Buf out) {
  int32_t* p = ptr<int32_t>(pass);
  const int32_t* t = ptr<const int32_t>(tokens);
  int32_t* o = ptr<int32_t>(out);
  record("next_token", [=, s = stream_] { cuda::next_token(p, t, o, s); }, p, t, o);
}

static_assert(Backend::kMaxTopK <= kTopKMax, "the seam's bound on k is one the kernels take");

void CudaBackend::top_k(Buf logits, int n, int k, const int32_t* skip, int n_skip, Candidate* top, float* skipped) {
  check_top_k(n, k, skip, n_skip);
  // sampler_: the blocks' keys, then int32 / float arrays: skip ids, and the results as one
  // download (ids, logits, skipped floats)
  const size_t keys = top_k_scratch(n, k), results = size_t(2 * k + n_skip);
  check(cudaSetDevice(device_), "cudaSetDevice");
  uint8_t* base = static_cast<uint8_t*>(sampler_.need(keys + (size_t(n_skip) + results) * 4));
  int32_t* skip_d = reinterpret_cast<int32_t*>(base + keys);
  int32_t* ids = skip_d + n_skip;
  float* values = reinterpret_cast<float*>(ids + k);
  if (n_skip) check(cudaMemcpyAsync(skip_d, skip, size_t(n_skip) * 4, cudaMemcpyHostToDevice, stream_), "upload");
  cuda::top_k(ptr<const float>(logits), n, k, skip_d, n_skip, ids, values, values + k, base, stream_);
  std::vector<int32_t> out(results);
  check(cudaMemcpyAsync(out.data(), ids, results * 4, cudaMemcpyDeviceToHost, stream_), "download");
  check(cudaStreamSynchronize(stream_), "top_k");
  for (int i = 0; i < k; ++i) {
    top[i].id = out[size_t(i)];
    std::memcpy(&top[i].logit, &out[size_t(k + i)], 4);
  }
  std::memcpy(skipped, out.data() + 2 * k, size_t(n_skip) * 4);
}

}  // namespace upg::cuda
