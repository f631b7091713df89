// Many sequences in one pass: n_slots KV regions over a shared read-only Model, and steps that
// evaluate tokens of several slots at once (the linear layers once over all the step's tokens,
// attention per sequence). The server's scheduler (upg_backend/batch.py) decides what each step
// holds: one generated token of every running sequence and chunks of the prompts being admitted.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "upg/backend.h"
#include "upg/graph.h"
#include "upg/model.h"

namespace upg {

class BatchSession {
 public:
  // n_ctx: positions of each slot; n_batch: the most tokens one step takes.
  BatchSession(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int n_slots, int n_ctx,
               KVType kv_type, int n_batch = 512);

  // Tokens of one slot in a step, appended at its n_past. generated: sampled tokens (decode
  // arithmetic), else prompt tokens (prompt arithmetic): a token's results depend on its kind and
  // its sequence only, never on what else the step holds. logits: which of the entry's tokens'
  // logits are wanted; kArgmax: only the argmax of the last token's (the first maximum), computed
  // on the backend (a greedy stream: one id comes back instead of a row).
  enum class Logits { kNone, kLast, kAll, kArgmax };
  struct Entry {
    int slot;
    const int32_t* tokens;
    int n;
    bool generated;
    Logits logits;
  };
  // Rows of logits step() writes for these entries, and the ids it writes (kArgmax entries).
  static int64_t logit_rows(const std::vector<Entry>& entries);
  static int64_t argmax_count(const std::vector<Entry>& entries);
  // One pass over the entries (at most one per slot, n_batch tokens in all); writes the logits
  // the entries ask for into out[row][vocab] and the kArgmax entries' ids into ids[], each entry
  // after entry in order. Throws std::invalid_argument (nothing evaluated) when an entry does not
  // fit its slot, names a slot twice or holds a token outside the vocabulary.
  void step(const std::vector<Entry>& entries, float* out, int32_t* ids = nullptr);

  int n_slots() const { return n_slots_; }
  int n_ctx() const { return n_ctx_; }
  int n_batch() const { return n_batch_; }
  int64_t n_past(int slot) const { return n_past_.at(size_t(check_slot(slot))); }
  void truncate(int slot, int64_t n);  // keeps positions [0, n) of the slot
  // Slot dst's positions [0, n) become slot src's (a shared prompt prefix, computed once); dst's
  // n_past becomes n.
  void copy_prefix(int src, int dst, int64_t n);

  const Model& model() const { return *model_; }
  const Backend& backend() const { return *backend_; }

 private:
  int check_slot(int slot) const;

  std::shared_ptr<const Model> model_;
  std::shared_ptr<Backend> backend_;
  int n_slots_, n_ctx_, n_batch_;
  Graph graph_;
  Buf weights_;
  std::vector<Buf> buffers_;  // by Graph::BufferId
  std::vector<int64_t> n_past_;
};

}  // namespace upg
