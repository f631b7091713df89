// The CUDA backend: the seam's ops (upg/backend.h) over the kernel layer (kernels.cuh), device
// memory, and whole passes replayed as CUDA graphs.
//
// Memory: the weights (the file's data section) are copied to the device once, as they are (the
// kernels read the file's layout with 16-byte loads: no repacking), and that copy is shared by
// every backend on the GPU whose sessions run the same content; buffers are cudaMalloc'd and
// zero-filled; upload / download are stream copies. VRAM = weights + each session's buffers (KV
// cache, activations, logits) + each backend's decode-attention workspace.
//
// Passes: the ops of a pass are recorded (not launched) between begin() and end(). end() compares
// the record with the previous pass's: a decode step issues the same ops with the same arguments
// at every position (the position is in the pass buffer), so from the second step on the captured
// graph of the first is replayed with one cudaGraphLaunch. Anything else is captured anew.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kernels.cuh"
#include "upg/backend.h"

namespace upg::cuda {

// The kernels of a pass's generated rows (its prompt rows always run the mat-mul). Either way a
// row's bits depend on its kind only, never on what else the pass holds.
enum class Generated {
  kMatvec,  // the mat-vec (a lone token's decode ops fused) and matvec_n: fastest for one stream
  kMatmul,  // the prompt rows' mat-mul in its small token tiles: many streams' tokens on the tensor cores
};

class CudaBackend : public Backend {
 public:
  // Throws std::runtime_error when there is no such GPU.
  explicit CudaBackend(int device = 0, Generated generated = Generated::kMatvec);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  const char* name() const override { return "cuda"; }
  int max_seqs() const override { return 1 << 20; }  // the kernels read each token's UpgToken
  Buf weights(const void* data, size_t bytes, uint64_t content) override;
  Buf alloc(size_t bytes) override;
  void upload(Buf dst, const void* src, size_t bytes) override;
  void download(void* dst, Buf src, size_t bytes) override;
  void begin(Buf pass) override;
  void end() override;

  void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) override;
  void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) override;
  void linear(const Matrix& w, Buf x, int n_tokens, int n_decode, Buf y) override;
  void rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& args) override;
  void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) override;
  void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& args) override;
  void silu_mul(Buf gate_up, Buf out, int n_tokens, int n) override;
  void add(Buf x, Buf y, int n) override;
  // A pass's one generated token: one mat-vec each, the norm or silu_mul in its prologue and the
  // residual add in its epilogue (7 launches a layer instead of 12); else the ops one by one.
  void norm_linear(Buf x, Buf weight, float eps, Buf xn, const Matrix& w, int n_tokens, int n_decode, Buf y) override;
  void linear_add(const Matrix& w, Buf in, int n_tokens, int n_decode, Buf tmp, Buf x) override;
  void silu_linear_add(const Matrix& w, Buf gate_up, int n_tokens, int n_decode, Buf act, Buf tmp, Buf x) override;
  void argmax(Buf x, int n, Buf out) override;
  void next_token(Buf pass, Buf tokens, Buf out) override;
  // Two launches (top_k.cu) between one small upload (the skip ids) and one small download.
  void top_k(Buf logits, int n, int k, const int32_t* skip, int n_skip, Candidate* top, float* skipped) override;

  Generated generated() const { return generated_; }
  // Passes run so far, and how many of them were replays of the captured graph.
  int64_t passes() const { return passes_; }
  int64_t replays() const { return replays_; }
  // Device memory held: weights (counted by every backend that shares them), buffers and the
  // attention workspace.
  size_t device_bytes() const { return device_bytes_ + workspace_.bytes(); }

 private:
  template <typename T = uint8_t>
  T* ptr(Buf b) const { return reinterpret_cast<T*>(static_cast<uint8_t*>(base_.at(size_t(b.id)).get()) + b.offset); }
  Weight weight(const Matrix& m, int n_tokens) const;
  // Records one launch: its arguments' bytes go into the pass's signature.
  template <typename... A>
  void record(const char* op, std::function<void()> launch, const A&... args);
  void record_fused_matvec(const char* op, const Matrix& m, Buf x, Buf y, const MatvecFuse& f);
  // Whether a run of ops is one fused mat-vec: a pass of one token, generated, on the mat-vec.
  bool fuses(int n_tokens, int n_decode) const {
    return n_tokens == 1 && n_decode == 1 && generated_ == Generated::kMatvec;
  }

  int device_;
  Generated generated_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::shared_ptr<void>> base_;  // by buffer id; the weights' may be shared
  int32_t* pass_ = nullptr;       // of the pass begun
  // One scratch buffer for the ops that need one (decode attention's splits, the mat-mul's rounded
  // x): the launches of a stream run one after another, so they can share it. Grows, never shrinks.
  // The ops record its address and their need; end() grows it before the pass is captured.
  void* const* workspace(size_t bytes);
  DeviceScratch workspace_;
  size_t workspace_need_ = 0;     // of the pass being recorded
  size_t device_bytes_ = 0;       // of base_

  std::vector<std::function<void()>> ops_;  // of the pass being recorded
  std::string signature_;                   // its ops and arguments, as bytes
  std::string graph_signature_;             // of the graph below
  cudaGraphExec_t graph_ = nullptr;
  int64_t passes_ = 0, replays_ = 0;

  DeviceScratch sampler_;  // top_k's skip ids, results and blocks' keys
};

}  // namespace upg::cuda
