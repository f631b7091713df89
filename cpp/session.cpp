#include "upg/session.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace upg {

Buf model_weights(Backend& backend, const Model& model) {
  const UPGFile& f = model.file();
  return backend.weights(f.data_section(), f.file_size() - f.data_offset(), f.content_id());
}

void check_tokens(const Model& model, const int32_t* tokens, int64_t n) {
  const int32_t vocab = model.config().vocab_size;
  if (n < 1) throw std::invalid_argument("eval needs at least one token");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
}

int32_t sample_row(Backend& backend, Buf row, int32_t n_vocab, const SamplingParams& p, const int32_t* history,
                   int64_t n_history, Rng& rng) {
  const int k = kept(p);
  if (k < 1 || k > Backend::kMaxTopK) {
    std::vector<float> logits(static_cast<size_t>(n_vocab));
    backend.download(logits.data(), row, logits.size() * sizeof(float));
    return sample_token(logits.data(), n_vocab, p, history, n_history, rng);
  }
  const std::vector<Adjustment> adj = adjustments(p, history, n_history, n_vocab);
  std::vector<int32_t> skip;
  for (const Adjustment& a : adj) skip.push_back(a.id);
  std::vector<Candidate> top(static_cast<size_t>(k));
  std::vector<float> raw(adj.size());
  backend.top_k(row, n_vocab, k, skip.data(), int(skip.size()), top.data(), raw.data());
  return sample_candidates(top.data(), k, adj, raw.data(), p, rng);
}

Session::Session(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int n_ctx, KVType kv_type,
                 int n_batch)
    : model_(std::move(model)),
      backend_(std::move(backend)),
      n_ctx_(n_ctx),
      n_batch_(std::min(n_batch, n_ctx)),
      kv_type_(kv_type),
      graph_(*model_, n_ctx, n_batch_, kv_type) {
  weights_ = model_weights(*backend_, *model_);
  buffers_ = graph_.alloc(*backend_);
}

void Session::truncate(int64_t n) {
  if (n < 0 || n > n_past_) throw std::invalid_argument("truncate: position out of range");
  n_past_ = n;
}

void Session::check_room(int64_t n) const {
  if (n > n_ctx_ - n_past_)
    throw std::invalid_argument("context full: " + std::to_string(n_past_) + " + " + std::to_string(n) +
                                " tokens exceed n_ctx " + std::to_string(n_ctx_));
}

template <typename Fn>
void Session::run(const int32_t* tokens, int64_t n, bool generated, Graph::Output last, Graph::Output others,
                  bool all_rows, Fn download) {
  check_tokens(*model_, tokens, n);
  check_room(n);
  for (int64_t done = 0; done < n;) {
    const int m = int(std::min<int64_t>(n_batch_, n - done));
    Graph::Pass p;
    p.seqs = {{0, int(n_past_), m}};
    p.n_decode = generated ? m : 0;
    p.output = done + m == n ? last : others;
    if (p.output == Graph::Output::kLogits) p.logits = {all_rows ? Graph::Rows{0, m} : Graph::Rows{m - 1, 1}};
    graph_.run(*backend_, weights_, buffers_, tokens + done, p);
    download(done, m, p.output);
    n_past_ += m;
    done += m;
  }
}

void Session::eval(const int32_t* tokens, int64_t n, bool all_logits, float* out, bool generated) {
  const size_t vocab = size_t(model_->config().vocab_size);
  const Graph::Output others = all_logits ? Graph::Output::kLogits : Graph::Output::kNone;
  run(tokens, n, generated, Graph::Output::kLogits, others, all_logits, [&](int64_t first, int m, Graph::Output output) {
    // Rows of each batch go to their place in out; only the final row is kept otherwise.
    if (output != Graph::Output::kLogits) return;
    if (all_logits) backend_->download(out + first * vocab, buffers_[Graph::kLogits], size_t(m) * vocab * sizeof(float));
    else backend_->download(out, buffers_[Graph::kLogits], vocab * sizeof(float));
  });
}

void Session::eval_hidden(const int32_t* tokens, int64_t n, float* out) {
  const size_t hidden = size_t(model_->config().hidden_size);
  run(tokens, n, false, Graph::Output::kHidden, Graph::Output::kHidden, false, [&](int64_t first, int m, Graph::Output) {
    backend_->download(out + first * hidden, buffers_[Graph::kXn], size_t(m) * hidden * sizeof(float));
  });
}

void Session::decode_greedy(int32_t token, int64_t n, int32_t* out) {
  check_tokens(*model_, &token, 1);
  if (n < 1) throw std::invalid_argument("decode_greedy needs at least one token");
  check_room(n);
  Graph::Pass p;
  p.seqs = {{0, int(n_past_), 1}};
  p.n_decode = 1;
  p.output = Graph::Output::kGreedy;
  p.logits = {Graph::Rows{0, 1}};
  const std::vector<uint8_t> pass = graph_.pass_bytes(p);
  backend_->upload(buffers_[Graph::kTokens], &token, sizeof(token));
  backend_->upload(buffers_[Graph::kPass], pass.data(), pass.size());
  for (int64_t i = 0; i < n; ++i) {  // each pass reads the token and position the last one left
    p.seqs[0].n_past = int(n_past_ + i);  // the host's copy, for its own choices (LongRoPE's set)
    backend_->begin(buffers_[Graph::kPass]);
    graph_.forward(*backend_, weights_, buffers_, p);
    backend_->end();
  }
  // kGenerated[p]: the argmax after the token at position p
  backend_->download(out, buffers_[Graph::kGenerated].at(uint64_t(n_past_) * sizeof(int32_t)),
                     size_t(n) * sizeof(int32_t));
  n_past_ += n;
}

int32_t Session::eval_sample(int32_t token, const SamplingParams& p, const int32_t* history, int64_t n_history,
                             Rng& rng) {
  const int32_t vocab = model_->config().vocab_size;
  adjustments(p, history, n_history, vocab);  // throws on a bad bias before the token goes in
  run(&token, 1, true, Graph::Output::kLogits, Graph::Output::kNone, false, [](int64_t, int, Graph::Output) {});
  return sample_row(*backend_, buffers_[Graph::kLogits], vocab, p, history, n_history, rng);
}

void Session::last_logits(float* out) {
  backend_->download(out, buffers_[Graph::kLogits], size_t(model_->config().vocab_size) * sizeof(float));
}

template <typename Fn>
void Session::for_each_kv_run(int64_t n, Fn fn) const {
  const ModelConfig& c = model_->config();
  const uint64_t elem = graph_.kv_elem_bytes(), head = uint64_t(n_ctx_) * c.head_dim * elem;
  const uint64_t bytes = uint64_t(n) * c.head_dim * elem;
  for (uint64_t h = 0; h < uint64_t(c.num_hidden_layers) * c.num_key_value_heads; ++h)
    fn(buffers_[Graph::kKCache].at(h * head), buffers_[Graph::kVCache].at(h * head), bytes);
}

std::vector<uint8_t> Session::save_kv() const {
  std::vector<uint8_t> out;
  for_each_kv_run(n_past_, [&](Buf k, Buf v, uint64_t bytes) {
    const size_t at = out.size();
    out.resize(at + 2 * bytes);
    backend_->download(out.data() + at, k, bytes);
    backend_->download(out.data() + at + bytes, v, bytes);
  });
  return out;
}

void Session::load_kv(int64_t n_past, const uint8_t* data, size_t size) {
  if (n_past < 0 || n_past > n_ctx_) throw std::invalid_argument("load_kv: n_past out of range for this context");
  const ModelConfig& c = model_->config();
  if (size != 2 * size_t(c.num_hidden_layers) * c.num_key_value_heads * size_t(n_past) * c.head_dim * graph_.kv_elem_bytes())
    throw std::invalid_argument("load_kv: state size does not match this model, kv_type and n_past");
  for_each_kv_run(n_past, [&](Buf k, Buf v, uint64_t bytes) {
    backend_->upload(k, data, bytes);
    backend_->upload(v, data + bytes, bytes);
    data += 2 * bytes;
  });
  n_past_ = n_past;
}

}  // namespace upg
