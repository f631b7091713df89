#include "upg/batch.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "upg/session.h"

namespace upg {

BatchSession::BatchSession(std::shared_ptr<const Model> model, std::shared_ptr<Backend> backend, int n_slots,
                           int n_ctx, KVType kv_type, int n_batch)
    : model_(std::move(model)),
      backend_(std::move(backend)),
      n_slots_(n_slots),
      n_ctx_(n_ctx),
      n_batch_(n_batch),
      graph_(*model_, n_ctx, n_batch, kv_type, n_slots),
      n_past_(size_t(std::max(n_slots, 0)), 0) {
  if (n_slots > backend_->max_seqs())
    throw std::invalid_argument(std::string("the ") + backend_->name() + " backend runs one sequence per pass (n_slots 1)");
  weights_ = model_weights(*backend_, *model_);
  buffers_ = graph_.alloc(*backend_);
}

int BatchSession::check_slot(int slot) const {
  if (slot < 0 || slot >= n_slots_)
    throw std::invalid_argument("slot " + std::to_string(slot) + " outside [0, " + std::to_string(n_slots_) + ")");
  return slot;
}

void BatchSession::truncate(int slot, int64_t n) {
  if (n < 0 || n > n_past_[size_t(check_slot(slot))]) throw std::invalid_argument("truncate: position out of range");
  n_past_[size_t(slot)] = n;
}

void BatchSession::copy_prefix(int src, int dst, int64_t n) {
  if (n < 0 || n > n_past_[size_t(check_slot(src))]) throw std::invalid_argument("copy_prefix: more positions than the source holds");
  check_slot(dst);
  if (src != dst) {
    const ModelConfig& c = model_->config();
    const uint64_t elem = graph_.kv_elem_bytes(), row = uint64_t(c.head_dim) * elem;
    const uint64_t head = uint64_t(n_slots_) * n_ctx_ * row;  // one kv head's run, all slots
    std::vector<uint8_t> tmp(size_t(uint64_t(n) * row));
    for (uint64_t h = 0; h < uint64_t(c.num_hidden_layers) * c.num_key_value_heads; ++h)
      for (Graph::BufferId id : {Graph::kKCache, Graph::kVCache}) {
        const Buf run = buffers_[id].at(h * head);
        backend_->download(tmp.data(), run.at(uint64_t(src) * n_ctx_ * row), tmp.size());
        backend_->upload(run.at(uint64_t(dst) * n_ctx_ * row), tmp.data(), tmp.size());
      }
  }
  n_past_[size_t(dst)] = n;
}

int64_t BatchSession::logit_rows(const std::vector<Entry>& entries) {
  int64_t rows = 0;
  for (const Entry& e : entries) rows += e.logits == Logits::kAll ? e.n : e.logits == Logits::kLast ? 1 : 0;
  return rows;
}

int64_t BatchSession::argmax_count(const std::vector<Entry>& entries) {
  return std::count_if(entries.begin(), entries.end(), [](const Entry& e) { return e.logits == Logits::kArgmax; });
}

void BatchSession::step(const std::vector<Entry>& entries, float* out, int32_t* ids) {
  if (entries.empty()) throw std::invalid_argument("step: no entries");
  if (argmax_count(entries) > 0 && !ids) throw std::invalid_argument("step: argmax entries need somewhere for their ids");
  std::vector<bool> seen(size_t(n_slots_), false);
  int64_t total = 0;
  for (const Entry& e : entries) {
    check_slot(e.slot);
    if (seen[size_t(e.slot)]) throw std::invalid_argument("step: slot " + std::to_string(e.slot) + " named twice");
    seen[size_t(e.slot)] = true;
    check_tokens(*model_, e.tokens, e.n);
    if (e.n > n_ctx_ - n_past_[size_t(e.slot)])
      throw std::invalid_argument("context full in slot " + std::to_string(e.slot) + ": " +
                                  std::to_string(n_past_[size_t(e.slot)]) + " + " + std::to_string(e.n) +
                                  " tokens exceed n_ctx " + std::to_string(n_ctx_));
    total += e.n;
  }
  if (total > n_batch_)
    throw std::invalid_argument("step: " + std::to_string(total) + " tokens exceed n_batch " + std::to_string(n_batch_));

  // Generated tokens first (UpgPass::n_decode), then the prompts; each entry's logits row.
  std::vector<size_t> order(entries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_partition(order.begin(), order.end(), [&](size_t i) { return entries[i].generated; });
  Graph::Pass p;
  std::vector<int32_t> tokens;
  std::vector<int> out_row(entries.size(), -1);  // first row of kLogits of each entry
  int row = 0;
  for (size_t i : order) {
    const Entry& e = entries[i];
    const int first = int(tokens.size());
    p.seqs.push_back({e.slot, int(n_past_[size_t(e.slot)]), e.n});
    if (e.generated) p.n_decode += e.n;
    tokens.insert(tokens.end(), e.tokens, e.tokens + e.n);
    if (e.logits == Logits::kNone) continue;
    const Graph::Rows r = e.logits == Logits::kAll ? Graph::Rows{first, e.n} : Graph::Rows{first + e.n - 1, 1};
    Graph::Rows* last = p.logits.empty() ? nullptr : &p.logits.back();
    // one run over consecutive rows of the same kind (generated rows come first)
    if (last && last->first + last->count == r.first && (last->first < p.n_decode) == (r.first < p.n_decode))
      last->count += r.count;
    else
      p.logits.push_back(r);
    out_row[i] = row;
    row += r.count;
  }
  for (size_t i = 0; i < entries.size(); ++i)  // in the entries' order: kTokens then holds the ids as step() returns them
    if (entries[i].logits == Logits::kArgmax) p.argmax_rows.push_back(out_row[i]);
  p.output = row > 0 ? Graph::Output::kLogits : Graph::Output::kNone;
  graph_.run(*backend_, weights_, buffers_, tokens.data(), p);
  const size_t vocab = size_t(model_->config().vocab_size);
  if (!p.argmax_rows.empty()) backend_->download(ids, buffers_[Graph::kTokens], p.argmax_rows.size() * sizeof(int32_t));
  // The entries' rows, in their order; one download when kLogits holds them in that order already
  // (a GPU synchronizes once instead of once per entry).
  bool in_order = p.argmax_rows.empty();
  for (size_t i = 0, next = 0; i < entries.size(); ++i) {
    if (entries[i].logits == Logits::kNone) continue;
    in_order &= size_t(out_row[i]) == next;
    next += entries[i].logits == Logits::kAll ? size_t(entries[i].n) : 1;
  }
  if (in_order && row > 0) {
    backend_->download(out, buffers_[Graph::kLogits], size_t(row) * vocab * sizeof(float));
  } else {
    float* o = out;
    for (size_t i = 0; i < entries.size(); ++i) {
      const Entry& e = entries[i];
      if (e.logits == Logits::kNone || e.logits == Logits::kArgmax) continue;
      const size_t rows = e.logits == Logits::kAll ? size_t(e.n) : 1;
      backend_->download(o, buffers_[Graph::kLogits].at(uint64_t(out_row[i]) * vocab * 4), rows * vocab * sizeof(float));
      o += rows * vocab;
    }
  }
  for (const Entry& e : entries) n_past_[size_t(e.slot)] += e.n;
}

}  // namespace upg
