#include "upg/model.h"

#include <cmath>
#include <stdexcept>

namespace upg {
namespace {

std::string layer_name(int i, const char* rest) { return "model.layers." + std::to_string(i) + "." + rest; }

}  // namespace

void ModelConfig::check() const {
  auto positive = [](int v, const char* name) {
    if (v <= 0) throw std::invalid_argument(std::string("config: ") + name + " must be positive");
  };
  positive(hidden_size, "hidden_size");
  positive(intermediate_size, "intermediate_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(num_key_value_heads, "num_key_value_heads");
  positive(head_dim, "head_dim");
  positive(vocab_size, "vocab_size");
  if (num_attention_heads % num_key_value_heads) throw std::invalid_argument("config: heads must be a multiple of kv heads");
  if (rotary_dim <= 0 || rotary_dim > head_dim || rotary_dim % 2) throw std::invalid_argument("config: bad rotary_dim");
  if (longrope && (short_factor.size() != size_t(rotary_dim / 2) || long_factor.size() != size_t(rotary_dim / 2)))
    throw std::invalid_argument("config: longrope factors must have rotary_dim / 2 entries");
  if (!(rms_norm_eps > 0) || !(rope_theta > 0)) throw std::invalid_argument("config: eps and rope_theta must be positive");
}

Model::Model(const std::string& path, const ModelConfig& config) : file_(path), cfg_(config) {
  cfg_.check();
  const uint64_t hidden = cfg_.hidden_size, inter = cfg_.intermediate_size, hd = cfg_.head_dim;
  const uint64_t qkv_rows = (cfg_.num_attention_heads + 2 * uint64_t(cfg_.num_key_value_heads)) * hd;
  embed_ = matrix("model.embed_tokens.weight", cfg_.vocab_size, hidden);
  lm_head_ = cfg_.tie_word_embeddings ? embed_ : matrix("lm_head.weight", cfg_.vocab_size, hidden);
  final_norm_ = vector_f32("model.norm.weight", hidden);
  for (int i = 0; i < cfg_.num_hidden_layers; ++i) {
    layers_.push_back(LayerWeights{
        vector_f32(layer_name(i, "input_layernorm.weight"), hidden),
        matrix(layer_name(i, "self_attn.qkv_proj.weight"), qkv_rows, hidden),
        matrix(layer_name(i, "self_attn.o_proj.weight"), hidden, uint64_t(cfg_.num_attention_heads) * hd),
        vector_f32(layer_name(i, "post_attention_layernorm.weight"), hidden),
        matrix(layer_name(i, "mlp.gate_up_proj.weight"), 2 * inter, hidden),
        matrix(layer_name(i, "mlp.down_proj.weight"), hidden, inter),
    });
  }
  // Inverse frequencies in float32, computed as transformers computes them.
  const int half = cfg_.rotary_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float expo = float(2 * i) / float(cfg_.rotary_dim);
    const float base = float(std::pow(double(cfg_.rope_theta), double(expo)));
    inv_freq_short_.push_back(1.0f / ((cfg_.longrope ? cfg_.short_factor[i] : 1.0f) * base));
    inv_freq_long_.push_back(1.0f / ((cfg_.longrope ? cfg_.long_factor[i] : 1.0f) * base));
  }
}

// The reader checks shape, type and outliers (UPGFile::weight); the Matrix records where they lie.
Matrix Model::matrix(const std::string& name, uint64_t rows, uint64_t cols) const {
  const WeightView w = file_.weight(name, rows, cols);
  Matrix m;
  m.type = w.type;
  m.block = w.block;
  m.rows = w.rows;
  m.cols = w.cols;
  m.data = Buf{kDataSection, file_.find(name)->offset};
  if (w.o_rowptr) {
    m.rowptr = Buf{kDataSection, file_.find(name + ".outlier_rowptr")->offset};
    m.col = Buf{kDataSection, file_.find(name + ".outlier_col")->offset};
    m.val = Buf{kDataSection, file_.find(name + ".outlier_val")->offset};
  }
  return m;
}

Buf Model::vector_f32(const std::string& name, uint64_t n) const {
  file_.vector_f32(name, n);
  return Buf{kDataSection, file_.find(name)->offset};
}

}  // namespace upg
