// The model the graph runs (Phi3; Llama-family checkpoints run on it once fused): its config and
// a read-only Model over the mapped UPG file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "upg/backend.h"
#include "upg/format.h"

namespace upg {

// The engine's flat config; upg_backend/config.py settles every Hugging Face variant into it.
struct ModelConfig {
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int rotary_dim = 0;                    // head_dim * partial_rotary_factor: rotated dims come first
  int vocab_size = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool longrope = false;                 // per-frequency factors, short or long by sequence length
  int original_max_position_embeddings = 0;
  std::vector<float> short_factor, long_factor;  // [rotary_dim / 2] each
  float attention_factor = 1.0f;         // longrope's scale on cos and sin
  bool tie_word_embeddings = false;

  void check() const;  // throws std::invalid_argument
};

// The weights are located by offsets from the first byte of the file's data section: Bufs of id
// kDataSection here, which graph.h moves into a backend's weights buffer.
constexpr int kDataSection = 0;

struct LayerWeights {
  Buf attn_norm;   // f32 [hidden]
  Matrix qkv;      // [(n_heads + 2 n_kv) * head_dim, hidden]: Q rows, K rows, V rows
  Matrix o;        // [hidden, n_heads * head_dim]
  Buf mlp_norm;    // f32 [hidden]
  Matrix gate_up;  // [2 * intermediate, hidden]: gate rows, then up rows
  Matrix down;     // [hidden, intermediate]
};

// The read-only model: the mapped file, its config, where each weight lies. Shared by sessions.
class Model {
 public:
  Model(const std::string& path, const ModelConfig& config);  // throws FormatError on a bad file

  const ModelConfig& config() const { return cfg_; }
  const UPGFile& file() const { return file_; }
  const Matrix& embed() const { return embed_; }        // [vocab, hidden]
  const Matrix& lm_head() const { return lm_head_; }    // [vocab, hidden], the embedding when tied
  Buf final_norm() const { return final_norm_; }        // f32 [hidden]
  const std::vector<LayerWeights>& layers() const { return layers_; }
  // RoPE's inverse frequencies [rotary_dim / 2] (LongRoPE: with the short or the long factors).
  const std::vector<float>& inv_freq(bool long_factors) const { return long_factors ? inv_freq_long_ : inv_freq_short_; }
  // LongRoPE uses its long factors once a pass reaches past the original context.
  bool long_factors(int64_t n_positions) const {
    return cfg_.longrope && n_positions > cfg_.original_max_position_embeddings;
  }

 private:
  Matrix matrix(const std::string& name, uint64_t rows, uint64_t cols) const;
  Buf vector_f32(const std::string& name, uint64_t n) const;

  UPGFile file_;
  ModelConfig cfg_;
  Matrix embed_, lm_head_;
  Buf final_norm_;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_short_, inv_freq_long_;  // [rotary_dim / 2]
};

enum class KVType { F32, F16 };

}  // namespace upg
