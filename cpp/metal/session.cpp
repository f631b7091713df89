#include "session.h"

#include <cstring>

namespace upg::metal {

Session::Session(std::shared_ptr<const Model> model, std::shared_ptr<Gpu> gpu, int n_ctx, KVType kv_type, int n_batch)
    : SessionBase(std::move(model), n_ctx, kv_type, n_batch),
      gpu_(std::move(gpu)),
      graph_(*model_, n_ctx_, n_batch_, kv_type == KVType::F16) {
  const std::vector<uint64_t> sizes = graph_.buffer_sizes();
  buffers_.push_back(gpu_->wrap(model_->file().data_section(), sizes[Graph::kWeights]));
  for (size_t i = 1; i < sizes.size(); ++i) buffers_.push_back(gpu_->alloc(sizes[i]));
  const std::vector<float> factors = graph_.rope_factors();
  std::memcpy(gpu_->contents(buffers_[Graph::kRopeFactors]), factors.data(), factors.size() * sizeof(float));
}

void Session::forward(const int32_t* tokens, int64_t n, bool all_logits, float* out) {
  std::memcpy(gpu_->contents(buffers_[Graph::kTokenIds]), tokens, size_t(n) * sizeof(int32_t));
  Ops ops(*gpu_);
  gpu_->begin();
  graph_.forward(ops, buffers_, int(n), int(n_past_), all_logits);
  gpu_->end();
  if (!out) return;
  const size_t rows = all_logits ? size_t(n) : 1;
  std::memcpy(out, gpu_->contents(buffers_[Graph::kLogits]), rows * model_->config().vocab_size * sizeof(float));
}

uint8_t* Session::kv_cache(bool v) {
  return static_cast<uint8_t*>(gpu_->contents(buffers_[v ? Graph::kVCache : Graph::kKCache]));
}

}  // namespace upg::metal
