// The Phi3 forward pass, written once for every backend: the buffers it needs (its plan) and the
// ops it calls on a Backend, in order. The ops' kernels are one hop away: cpu/backend.cpp and
// metal/backend.cpp implement each Backend method.
#pragma once
#include <cstdint>
#include <vector>

#include "upg/backend.h"
#include "upg/model.h"

namespace upg {

class Graph {
 public:
  // The buffers of one session by id (sizes: buffer_sizes()); the weights are the backend's own.
  enum BufferId {
    kTokens,     // int32 [n_batch] token ids of the pass
    kPass,       // UpgPass: n_past, n_tokens
    kInvFreq,    // f32 RoPE inverse frequencies: short set, then LongRoPE's long set
    kX,          // [n_batch][hidden] residual stream
    kXn,         // [n_batch][hidden] normed input of a block
    kQkv,        // [n_batch][(n_heads + 2 n_kv) * head_dim]
    kAttn,       // [n_batch][n_heads * head_dim]
    kGateUp,     // [n_batch][2 * intermediate]
    kAct,        // [n_batch][intermediate]
    kProj,       // [n_batch][hidden] output of o_proj / down
    kKCache,     // [layer][kv_head][n_ctx][head_dim], f16 or f32
    kVCache,     // the same for V
    kLogits,     // [n_batch][vocab]
    kGenerated,  // int32 [n_ctx] greedy decoding's tokens: [p] the argmax after position p (kGreedy)
    kBufferCount
  };

  Graph(const Model& model, int n_ctx, int n_batch, KVType kv_type);

  std::vector<uint64_t> buffer_sizes() const;  // bytes, by BufferId
  // What kInvFreq holds (uploaded once).
  std::vector<float> inv_freq_table() const;
  // Bytes of one layer's K (or V) cache, and of one kv head's run of n positions in it.
  uint64_t layer_kv_bytes() const;
  uint64_t kv_elem_bytes() const { return kv_type_ == KVType::F16 ? 2 : 4; }

  // What a pass leaves behind: logits of every token in kLogits [n][vocab] (kAllLogits), of the
  // last in kLogits [vocab] (kLastLogits), every token's hidden state after the final norm in kXn
  // [n][hidden] (kHidden: embeddings), or only the KV cache (kNone). kGreedy: the last token's
  // logits, their argmax appended to kGenerated and fed to the next pass (Backend::next_token).
  enum class Output { kNone, kLastLogits, kAllLogits, kHidden, kGreedy };
  // One pass of n <= n_batch tokens (ids in kTokens; UpgPass in kPass, the pass the caller began
  // on the backend) at positions n_past... weights: the backend's buffer of the file's data section.
  void forward(Backend& be, Buf weights, const std::vector<Buf>& buffers, int n, int n_past, Output output) const;

 private:
  const Model& model_;
  int n_ctx_, n_batch_;
  KVType kv_type_;
};

}  // namespace upg
