// A session on the Metal backend: the CPU Session's contract (upg::SessionBase) over a GPU that
// holds buffers and takes launches, running graph.h's forward pass. Portable: on Apple the GPU is
// the Metal Device (metal_backend.h); the tests give it the CPU harness.
#pragma once
#include <memory>
#include <vector>

#include "graph.h"
#include "ops.h"
#include "upg/model.h"

namespace upg::metal {

class Gpu : public Encoder {
 public:
  // A buffer over [data, data + bytes) without copying (the mapped weights; 16 KiB aligned and sized).
  virtual Buf wrap(const void* data, size_t bytes) = 0;
  // A new zero-filled buffer the CPU can read and write through contents().
  virtual Buf alloc(size_t bytes) = 0;
  virtual void* contents(Buf b) = 0;
  // Launches between begin() and end() run in order; end() returns when they are done.
  virtual void begin() = 0;
  virtual void end() = 0;
};

class Session : public SessionBase {
 public:
  Session(std::shared_ptr<const Model> model, std::shared_ptr<Gpu> gpu, int n_ctx, KVType kv_type, int n_batch = 512);

 private:
  void forward(const int32_t* tokens, int64_t n, bool all_logits, float* out) override;
  uint8_t* kv_cache(bool v) override;

  std::shared_ptr<Gpu> gpu_;
  Graph graph_;
  std::vector<Buf> buffers_;  // by Graph::BufferId
};

}  // namespace upg::metal
