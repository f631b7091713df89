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
    kPass,       // UpgPass, then up to n_batch UpgToken and UpgSeq entries (pass_bytes())
    kInvFreq,    // f32 RoPE inverse frequencies: short set, then LongRoPE's long set
    kX,          // [n_batch][hidden] residual stream
    kXn,         // [n_batch][hidden] normed input of a block
    kQkv,        // [n_batch][(n_heads + 2 n_kv) * head_dim]
    kAttn,       // [n_batch][n_heads * head_dim]
    kGateUp,     // [n_batch][2 * intermediate]
    kAct,        // [n_batch][intermediate]
    kProj,       // [n_batch][hidden] output of o_proj / down
    kKCache,     // [layer][kv_head][n_slots * n_ctx][head_dim], f16 or f32: slot s holds positions
                 // [s * n_ctx, (s + 1) * n_ctx) of each kv head's run
    kVCache,     // the same for V
    kLogits,     // [n_batch][vocab]
    kGenerated,  // int32 [n_ctx] greedy decoding's tokens: [p] the argmax after position p (kGreedy)
    kBufferCount
  };

  // n_ctx: positions of each of the n_slots KV regions (one sequence each).
  Graph(const Model& model, int n_ctx, int n_batch, KVType kv_type, int n_slots = 1);

  std::vector<uint64_t> buffer_sizes() const;  // bytes, by BufferId
  // The buffers on be, by BufferId, kInvFreq filled.
  std::vector<Buf> alloc(Backend& be) const;
  // What kInvFreq holds (uploaded once).
  std::vector<float> inv_freq_table() const;
  // Bytes of one layer's K (or V) cache.
  uint64_t layer_kv_bytes() const;
  int n_slots() const { return n_slots_; }
  uint64_t kv_elem_bytes() const { return kv_type_ == KVType::F16 ? 2 : 4; }

  // One pass: tokens of one or more sequences, each in its own KV slot. What it leaves behind:
  // the logits of the rows in `logits` in kLogits, one [vocab] row after another (kLogits), every
  // token's hidden state after the final norm in kXn [n][hidden] (kHidden: embeddings), or only the
  // KV cache (kNone). kGreedy: the last token's logits, their argmax stored in kGenerated and fed
  // to the next pass (Backend::next_token); a pass of one sequence and one generated token.
  enum class Output { kNone, kLogits, kHidden, kGreedy };
  struct Rows {
    int first, count;
  };
  struct Seq {
    int slot, n_past, n_tokens;  // the pass's next n_tokens tokens, at positions n_past.. of slot
  };
  struct Pass {
    std::vector<Seq> seqs;     // in the order of their tokens in kTokens
    int n_decode = 0;          // tokens [0, n_decode) are generated tokens (UpgPass): whole sequences
    Output output = Output::kNone;
    std::vector<Rows> logits;  // kLogits: runs of rows, in the order their logits are written
    // kLogits: rows of kLogits whose argmax (the first maximum) goes into kTokens [i], on the
    // backend (a step's greedy streams download one id each instead of a row of logits)
    std::vector<int> argmax_rows;
    int n_tokens() const;
  };
  // What kPass must hold for p (upload it before Backend::begin); throws std::invalid_argument
  // when a sequence does not fit its slot or n_decode splits a sequence.
  std::vector<uint8_t> pass_bytes(const Pass& p) const;
  // One pass (ids in kTokens, kPass as pass_bytes(p) says, the pass the caller began on the
  // backend). weights: the backend's buffer of the file's data section.
  void forward(Backend& be, Buf weights, const std::vector<Buf>& buffers, const Pass& p) const;
  // The whole pass on be: uploads the token ids (p.n_tokens() of them) and pass_bytes(p), begins,
  // runs forward and ends; the outputs can be downloaded when it returns.
  void run(Backend& be, Buf weights, const std::vector<Buf>& buffers, const int32_t* tokens, const Pass& p) const;

 private:
  const Model& model_;
  int n_ctx_, n_batch_, n_slots_;
  KVType kv_type_;
};

}  // namespace upg
