// The Phi3 graph (Llama-family checkpoints run on it once fused): a read-only Model over the mapped
// UPG file, and Sessions that each own a KV cache, a position and scratch buffers.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "upg/format.h"
#include "upg/kernels.h"
#include "upg/threadpool.h"

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

struct LayerWeights {
  const float* attn_norm;   // [hidden]
  WeightView qkv;           // [(n_heads + 2 n_kv) * head_dim, hidden]: Q rows, K rows, V rows
  WeightView o;             // [hidden, n_heads * head_dim]
  const float* mlp_norm;    // [hidden]
  WeightView gate_up;       // [2 * intermediate, hidden]: gate rows, then up rows
  WeightView down;          // [hidden, intermediate]
};

class Model {
 public:
  Model(const std::string& path, const ModelConfig& config);  // throws FormatError on a bad file

  const ModelConfig& config() const { return cfg_; }
  const UPGFile& file() const { return file_; }
  const WeightView& embed() const { return embed_; }        // [vocab, hidden]
  const WeightView& lm_head() const { return lm_head_; }    // [vocab, hidden], the embedding when tied
  const float* final_norm() const { return final_norm_; }   // [hidden]
  const std::vector<LayerWeights>& layers() const { return layers_; }
  const std::vector<float>& inv_freq(bool long_factors) const { return long_factors ? inv_freq_long_ : inv_freq_short_; }

 private:
  UPGFile file_;
  ModelConfig cfg_;
  WeightView embed_, lm_head_;
  const float* final_norm_ = nullptr;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_short_, inv_freq_long_;  // [rotary_dim / 2]
};

enum class KVType { F32, F16 };

// What every backend's session does: a KV cache of n_ctx positions and the current position over
// a shared read-only Model. The CPU Session below and the Metal one (cpp/metal/session.h) supply
// the forward pass of one batch and their cache's bytes.
class SessionBase {
 public:
  virtual ~SessionBase() = default;

  // Appends n tokens at positions n_past.. and writes logits: all n rows into out[n][vocab] when
  // all_logits, else only the last token's row into out[vocab]. Throws std::invalid_argument when
  // the tokens do not fit the context or a token id is outside the vocabulary.
  void eval(const int32_t* tokens, int64_t n, bool all_logits, float* out);
  // As eval, but writes every token's hidden state after the final norm into out[n][hidden]
  // instead of logits (embeddings). Throws std::invalid_argument on a backend without it.
  void eval_hidden(const int32_t* tokens, int64_t n, float* out);

  int64_t n_past() const { return n_past_; }
  int n_ctx() const { return n_ctx_; }
  void truncate(int64_t n);  // keeps positions [0, n) of the KV cache

  // The KV cache of positions [0, n_past) as bytes (per layer and kv head: K rows, then V rows),
  // and its inverse; load_kv throws std::invalid_argument when the size does not fit n_past.
  std::vector<uint8_t> save_kv() const;
  void load_kv(int64_t n_past, const uint8_t* data, size_t size);
  const Model& model() const { return *model_; }

 protected:
  // n_batch: the most tokens one forward pass takes (longer evals are cut into such batches).
  SessionBase(std::shared_ptr<const Model> model, int n_ctx, KVType kv_type, int n_batch);
  // One batch of n <= n_batch tokens at positions n_past..; out as eval's (null: no logits). The
  // caller advances n_past.
  virtual void forward(const int32_t* tokens, int64_t n, bool all_logits, float* out) = 0;
  // Whether forward honours want_hidden_: out then takes the normed hidden rows, not logits.
  virtual bool has_hidden_output() const { return false; }
  bool want_hidden_ = false;
  // The K (v false) or V cache: [layer][kv_head][n_ctx][head_dim] elements of kv_type.
  virtual uint8_t* kv_cache(bool v) = 0;
  const uint8_t* kv_cache(bool v) const { return const_cast<SessionBase*>(this)->kv_cache(v); }

  std::shared_ptr<const Model> model_;
  int n_ctx_, n_batch_;
  KVType kv_type_;
  int64_t n_past_ = 0;
};

class Session : public SessionBase {
 public:
  Session(std::shared_ptr<const Model> model, int n_ctx, KVType kv_type, int n_threads, int n_batch = 512);

 private:
  void forward(const int32_t* tokens, int64_t n, bool all_logits, float* out) override;
  bool has_hidden_output() const override { return true; }
  uint8_t* kv_cache(bool v) override;
  void matmul(const WeightView& w, const float* x, int64_t n, float* y);
  ActQ8 quantize_act(const float* x, int64_t n, int64_t cols, int block);
  void attention(int layer, int64_t n);
  void attention_blocked(int layer, int64_t n);
  // Passes of at least this many tokens run attention as matrix products.
  static constexpr int64_t kBlockedAttentionMin = 16;

  const Kernels& k_;
  ThreadPool pool_;

  // KV cache [layer][kv_head][n_ctx][head_dim], f32 or f16 (raw bits).
  std::vector<float> k_f32_, v_f32_;
  std::vector<uint16_t> k_f16_, v_f16_;

  // Run state for up to n_batch tokens (row-major, one row per token).
  std::vector<float> x_;        // [n_batch][hidden] residual stream
  std::vector<float> xn_;       // [n_batch][hidden] normed input of a block
  std::vector<float> qkv_;      // [n_batch][qkv_rows]
  std::vector<float> attn_;     // [n_batch][n_heads * head_dim]
  std::vector<float> gu_;       // [n_batch][2 * intermediate]
  std::vector<float> act_;      // [n_batch][intermediate]
  std::vector<float> proj_;     // [n_batch][hidden] output of o_proj / down
  std::vector<float> scores_;   // [n_threads][n_ctx] attention scores
  struct AttentionScratch {     // per thread, for attention_blocked; grown on demand
    std::vector<float> q, s, vt;  // query chunk, its scores, V^T of one kv head
  };
  std::vector<AttentionScratch> att_scratch_;
  std::vector<float> cos_, sin_;  // [n_batch][rotary_dim / 2]
  std::vector<int64_t> pos_;    // [n_batch]
  // A matmul input quantized to 8 bits (quantized weights), grown to the largest input.
  std::vector<int8_t> xq_;      // [n][cols]
  std::vector<float> xq_d_;     // [n][cols / block]
  std::vector<int32_t> xq_sum_; // [n][cols / block]
};

}  // namespace upg
