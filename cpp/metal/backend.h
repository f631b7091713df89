// The Metal backend: each op of the seam (upg/backend.h) as a kernel launch. Portable C++: an op
// records what to dispatch (the kernel, its buffers, argument bytes, threadgroup memory, geometry)
// and hands it to the Gpu. On Apple the Gpu is the Metal device (metal_backend.mm); in the tests it
// is a recorder whose launches run on the CPU harness, so the geometry and the whole forward pass
// (upg/graph.h) are tested on Linux. Apple GPUs share host memory: the weights are wrapped
// zero-copy and upload / download are copies into and out of shared buffers.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "upg/backend.h"

namespace upg::metal {

// One dispatchThreadgroups:threadsPerThreadgroup: with its bindings.
struct Launch {
  std::string kernel;
  std::vector<std::pair<int, Buf>> buffers;  // [[buffer(i)]] -> range; id -1: declared, not read
  int args_index = -1;                       // [[buffer(i)]] of the constant argument struct (-1: none)
  std::vector<uint8_t> args;                 // its bytes
  std::vector<uint32_t> tgmem;               // threadgroup memory 0, 1, ... in bytes (multiples of 16)
  std::array<uint32_t, 3> groups{1, 1, 1};
  uint32_t threads = 1;
};

// What the Metal backend runs on: buffers and launches.
class Gpu {
 public:
  virtual ~Gpu() = default;
  // A buffer over [data, data + bytes) without copying (the mapped weights; 16 KiB aligned and sized).
  virtual Buf wrap(const void* data, size_t bytes) = 0;
  // A new zero-filled buffer the CPU can read and write through contents().
  virtual Buf alloc(size_t bytes) = 0;
  virtual void* contents(Buf b) = 0;
  // Launches between begin() and end() run in order; end() returns when they are done.
  virtual void begin() = 0;
  virtual void end() = 0;
  virtual void dispatch(const Launch& launch) = 0;
};

// One launch per op; metal/*.metal documents each kernel and its dispatch.
class MetalBackend : public Backend {
 public:
  explicit MetalBackend(std::shared_ptr<Gpu> gpu) : gpu_(std::move(gpu)) {}

  const char* name() const override { return "metal"; }
  int max_seqs() const override { return 1 << 20; }  // the kernels read each token's UpgToken
  Buf weights(const void* data, size_t bytes, uint64_t) override { return gpu_->wrap(data, bytes); }
  Buf alloc(size_t bytes) override { return gpu_->alloc(bytes); }
  void upload(Buf dst, const void* src, size_t bytes) override;
  void download(void* dst, Buf src, size_t bytes) override;
  void begin(Buf pass) override {
    pass_ = pass;
    gpu_->begin();
  }
  void end() override { gpu_->end(); }

  void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) override;
  void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) override;
  // f32 activations for every type: mat-vec kernels for one token, mat-mat ones for more.
  void linear(const Matrix& w, Buf x, int n_tokens, int n_decode, Buf y) override;
  void rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& args) override;
  void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) override;
  void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& args) override;
  void silu_mul(Buf gate_up, Buf out, int n_tokens, int n) override;
  void add(Buf x, Buf y, int n) override;
  void argmax(Buf x, int n, Buf out) override;
  void next_token(Buf pass, Buf tokens, Buf out) override;

 private:
  std::shared_ptr<Gpu> gpu_;
  Buf pass_;  // of the pass begun: bound to the kernels that read the position
};

}  // namespace upg::metal
