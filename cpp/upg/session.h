// A session: one conversation's KV cache and position over a shared read-only Model, run by the
// one graph (graph.h) on a Backend. Any backend: the session moves only tokens in and logits out
// (and the KV cache for saved states) through the backend's upload and download.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "upg/backend.h"
#include "upg/graph.h"
#include "upg/model.h"
#include "upg/sampler.h"

namespace upg {

// The model's weights on the backend (Backend::weights over the file's data section).
Buf model_weights(Backend& backend, const Model& model);

// Throws std::invalid_argument unless 1 <= n and every id is inside the model's vocabulary.
void check_tokens(const Model& model, const int32_t* tokens, int64_t n);

// sample_token's pick from a logits row on the backend, moving only the candidates when the cut
// fits the backend's top_k (1 <= kept(p) <= Backend::kMaxTopK), else the whole row. Same errors.
int32_t sample_row(Backend& backend, Buf row, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                   int64_t n_history, Rng& rng);

class Session {
 public:
  // n_batch: the most tokens one forward pass takes (longer evals are cut into such batches).
  Session(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int n_ctx, KVType kv_type,
          int n_batch = 512);

  // Appends n tokens at positions n_past.. and writes logits: all n rows into out[n][vocab] when
  // all_logits, else only the last token's row into out[vocab]. generated: the tokens were sampled
  // (decode arithmetic) rather than given (prompt arithmetic); each kind gives the same bits for a
  // token whatever the eval's length (docs/ARCHITECTURE.md "Batch-invariant arithmetic"). Throws
  // std::invalid_argument when the tokens do not fit the context or a token id is outside the
  // vocabulary.
  void eval(const int32_t* tokens, int64_t n, bool all_logits, float* out, bool generated);
  // As eval, but writes every token's hidden state after the final norm into out[n][hidden]
  // instead of logits (embeddings).
  void eval_hidden(const int32_t* tokens, int64_t n, float* out);
  // Greedy decoding on the backend: appends `token`, then n - 1 more, each the argmax of the
  // logits before it (the first maximum), and writes the n argmaxes into out[n]; the last one is
  // not appended (as a sampled token is not until the next eval). One pass per token with nothing
  // uploaded or downloaded in between, so a GPU queues them back to back. Same errors as eval.
  void decode_greedy(int32_t token, int64_t n, int32_t* out);
  // eval of one generated token, then the next token sampled from its logits (sample_row: the
  // token sample_token picks with the same params, history and rng). The history should end with
  // `token`, as it does for eval + sample. Same errors as eval and sample_token; a bad logit_bias
  // is refused before the token is evaluated.
  int32_t eval_sample(int32_t token, const SamplingParams& p, const int32_t* history, int64_t n_history, Rng& rng);
  // The logits of the token eval_sample evaluated last, into out[vocab] (they stay on the backend
  // until asked for).
  void last_logits(float* out);

  int64_t n_past() const { return n_past_; }
  int n_ctx() const { return n_ctx_; }
  void truncate(int64_t n);  // keeps positions [0, n) of the KV cache

  // The KV cache of positions [0, n_past) as bytes (per layer and kv head: K rows, then V rows),
  // and its inverse; load_kv throws std::invalid_argument when the size does not fit n_past.
  std::vector<uint8_t> save_kv() const;
  void load_kv(int64_t n_past, const uint8_t* data, size_t size);

  const Model& model() const { return *model_; }
  const Backend& backend() const { return *backend_; }

 private:
  void check_room(int64_t n) const;  // throws unless n more positions fit the context
  // Runs the tokens in batches of n_batch; download(batch's first token, its count, its output)
  // takes each batch's results. last: the output of the final batch; others: of the rest.
  template <typename Fn>
  void run(const int32_t* tokens, int64_t n, bool generated, Graph::Output last, Graph::Output others, bool all_rows,
           Fn download);
  // Calls fn(K run, V run, bytes) for each (layer, kv head) run of positions [0, n) of the cache.
  template <typename Fn>
  void for_each_kv_run(int64_t n, Fn fn) const;

  std::shared_ptr<const Model> model_;
  std::shared_ptr<Backend> backend_;
  int n_ctx_, n_batch_;
  KVType kv_type_;
  Graph graph_;
  Buf weights_;
  std::vector<Buf> buffers_;  // by Graph::BufferId
  int64_t n_past_ = 0;
};

}  // namespace upg
