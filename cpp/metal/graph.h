// The Phi3 forward pass on the Metal ops, in the order of the CPU Session (cpp/model.cpp), over a
// fixed set of buffers: the weights (the file's data section, mapped), the KV cache and the
// activations. Portable: the tests record its launches and run them on the CPU harness.
#pragma once
#include <cstdint>
#include <vector>

#include "ops.h"
#include "upg/model.h"

namespace upg::metal {

class Graph {
 public:
  // Buffer ids, in the order the caller creates them (sizes: buffer_sizes()).
  enum BufferId { kWeights, kTokenIds, kX, kXn, kQkv, kAttn, kGateUp, kAct, kProj, kKCache, kVCache,
                  kLogits, kRopeFactors, kBufferCount };

  Graph(const Model& model, int n_ctx, int n_batch, bool kv_f16);

  // Bytes of each buffer by id; kWeights is the file's data section (16 KiB aligned and sized).
  std::vector<uint64_t> buffer_sizes() const;
  // What kRopeFactors must hold: LongRoPE's short factors, then its long ones (empty otherwise).
  std::vector<float> rope_factors() const;

  // Records one pass over n tokens (their ids in kTokenIds) at positions n_past..: logits of every
  // token into kLogits [n][vocab] when all_logits, else of the last token into kLogits [vocab].
  // buffers: the caller's buffers by BufferId.
  void forward(Ops& ops, const std::vector<Buf>& buffers, int n, int n_past, bool all_logits) const;

 private:
  Matrix matrix(const WeightView& w, Buf weights) const;
  Buf weight(const void* p, Buf weights) const;  // a pointer into the mapped data section

  const Model& model_;
  const uint8_t* data_;  // first byte of the data section
  int n_ctx_, n_batch_;
  bool kv_f16_;
};

}  // namespace upg::metal
