#include "upg/model.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace upg {
namespace {

std::string layer_name(int i, const char* rest) { return "model.layers." + std::to_string(i) + "." + rest; }

// out[i] = x[i] / rms(x) * w[i], the statistic in double (transformers computes it in float32).
void rmsnorm(float* out, const float* x, const float* w, int n, float eps) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float scale = float(1.0 / std::sqrt(ss / n + eps));
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * scale);
}

// Rotate-half (NeoX) RoPE on the first rotary_dim dims of one head: pairs (i, i + rotary_dim/2).
void rope(float* v, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i] + a * sin[i];
  }
}

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
  embed_ = file_.weight("model.embed_tokens.weight", cfg_.vocab_size, hidden);
  lm_head_ = cfg_.tie_word_embeddings ? embed_ : file_.weight("lm_head.weight", cfg_.vocab_size, hidden);
  final_norm_ = file_.vector_f32("model.norm.weight", hidden);
  for (int i = 0; i < cfg_.num_hidden_layers; ++i) {
    layers_.push_back(LayerWeights{
        file_.vector_f32(layer_name(i, "input_layernorm.weight"), hidden),
        file_.weight(layer_name(i, "self_attn.qkv_proj.weight"), qkv_rows, hidden),
        file_.weight(layer_name(i, "self_attn.o_proj.weight"), hidden, uint64_t(cfg_.num_attention_heads) * hd),
        file_.vector_f32(layer_name(i, "post_attention_layernorm.weight"), hidden),
        file_.weight(layer_name(i, "mlp.gate_up_proj.weight"), 2 * inter, hidden),
        file_.weight(layer_name(i, "mlp.down_proj.weight"), hidden, inter),
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

SessionBase::SessionBase(std::shared_ptr<const Model> model, int n_ctx, KVType kv_type, int n_batch)
    : model_(std::move(model)), n_ctx_(n_ctx), n_batch_(n_batch), kv_type_(kv_type) {
  if (n_ctx < 1) throw std::invalid_argument("n_ctx must be at least 1");
  if (n_batch < 1) throw std::invalid_argument("n_batch must be at least 1");
  n_batch_ = std::min(n_batch_, n_ctx_);
}

Session::Session(std::shared_ptr<const Model> model, int n_ctx, KVType kv_type, int n_threads, int n_batch)
    : SessionBase(std::move(model), n_ctx, kv_type, n_batch), k_(kernels()), pool_(n_threads) {
  const ModelConfig& c = model_->config();
  const size_t kv = size_t(c.num_hidden_layers) * c.num_key_value_heads * size_t(n_ctx) * c.head_dim;
  if (kv_type == KVType::F32) {
    k_f32_.assign(kv, 0.0f);
    v_f32_.assign(kv, 0.0f);
  } else {
    k_f16_.assign(kv, 0);
    v_f16_.assign(kv, 0);
  }
  const size_t nb = size_t(n_batch_);
  const size_t qkv_rows = size_t(c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim;
  x_.resize(nb * c.hidden_size);
  xn_.resize(nb * c.hidden_size);
  qkv_.resize(nb * qkv_rows);
  attn_.resize(nb * c.num_attention_heads * c.head_dim);
  gu_.resize(nb * 2 * size_t(c.intermediate_size));
  act_.resize(nb * size_t(c.intermediate_size));
  proj_.resize(nb * c.hidden_size);
  scores_.resize(size_t(pool_.size()) * n_ctx);
  att_scratch_.resize(size_t(pool_.size()));
  cos_.resize(nb * (c.rotary_dim / 2));
  sin_.resize(nb * (c.rotary_dim / 2));
  pos_.resize(nb);
}

void SessionBase::truncate(int64_t n) {
  if (n < 0 || n > n_past_) throw std::invalid_argument("truncate: position out of range");
  n_past_ = n;
}

// The cache's [layer][kv_head] runs of n positions: (first element, element count) each.
namespace {
template <typename Fn>
void for_each_kv_head(const ModelConfig& c, int n_ctx, int64_t n, Fn fn) {
  for (size_t head = 0; head < size_t(c.num_hidden_layers) * c.num_key_value_heads; ++head)
    fn(head * n_ctx * c.head_dim, size_t(n) * c.head_dim);
}
}  // namespace

std::vector<uint8_t> SessionBase::save_kv() const {
  const size_t elem = kv_type_ == KVType::F16 ? 2 : 4;
  const uint8_t *k = kv_cache(false), *v = kv_cache(true);
  std::vector<uint8_t> out;
  for_each_kv_head(model_->config(), n_ctx_, n_past_, [&](size_t at, size_t count) {
    out.insert(out.end(), k + at * elem, k + (at + count) * elem);
    out.insert(out.end(), v + at * elem, v + (at + count) * elem);
  });
  return out;
}

void SessionBase::load_kv(int64_t n_past, const uint8_t* data, size_t size) {
  if (n_past < 0 || n_past > n_ctx_) throw std::invalid_argument("load_kv: n_past out of range for this context");
  const ModelConfig& c = model_->config();
  const size_t elem = kv_type_ == KVType::F16 ? 2 : 4;
  if (size != 2 * size_t(c.num_hidden_layers) * c.num_key_value_heads * size_t(n_past) * c.head_dim * elem)
    throw std::invalid_argument("load_kv: state size does not match this model, kv_type and n_past");
  uint8_t *k = kv_cache(false), *v = kv_cache(true);
  for_each_kv_head(c, n_ctx_, n_past, [&](size_t at, size_t count) {
    const size_t bytes = count * elem;
    std::copy(data, data + bytes, k + at * elem);
    std::copy(data + bytes, data + 2 * bytes, v + at * elem);
    data += 2 * bytes;
  });
  n_past_ = n_past;
}

void SessionBase::eval(const int32_t* tokens, int64_t n, bool all_logits, float* out) {
  const int32_t vocab = model_->config().vocab_size;
  if (n < 1) throw std::invalid_argument("eval needs at least one token");
  if (n > n_ctx_ - n_past_)
    throw std::invalid_argument("context full: " + std::to_string(n_past_) + " + " + std::to_string(n) +
                                " tokens exceed n_ctx " + std::to_string(n_ctx_));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
  for (int64_t done = 0; done < n;) {
    const int64_t m = std::min<int64_t>(n_batch_, n - done);
    const bool last = done + m == n;
    // Rows of this batch go to their place in out; only the final row is kept otherwise.
    forward(tokens + done, m, all_logits, all_logits ? out + done * vocab : (last ? out : nullptr));
    n_past_ += m;
    done += m;
  }
}

uint8_t* Session::kv_cache(bool v) {
  if (kv_type_ == KVType::F16) return reinterpret_cast<uint8_t*>(v ? v_f16_.data() : k_f16_.data());
  return reinterpret_cast<uint8_t*>(v ? v_f32_.data() : k_f32_.data());
}

// Quantized once per matmul, before the threads split the rows (each reads every token's row).
ActQ8 Session::quantize_act(const float* x, int64_t n, int64_t cols, int block) {
  const size_t nq = size_t(n * cols), nb = size_t(n * cols / block);
  if (xq_.size() < nq) xq_.resize(nq);
  if (xq_d_.size() < nb) xq_d_.resize(nb), xq_sum_.resize(nb);
  // rows are whole numbers of blocks, so tokens [t0, t1) are one run of blocks
  auto rows = [&](int64_t t0, int64_t t1) {
    k_.quantize_act(x + t0 * cols, (t1 - t0) * cols, block, &xq_[t0 * cols], &xq_d_[t0 * cols / block],
                    &xq_sum_[t0 * cols / block]);
  };
  if (n == 1) rows(0, 1);  // not worth waking the pool
  else pool_.run([&](int t, int nt) { rows(n * t / nt, n * (t + 1) / nt); });
  return ActQ8{block, xq_.data(), xq_d_.data(), xq_sum_.data()};
}

void Session::matmul(const WeightView& w, const float* x, int64_t n, float* y) {
  const ActQ8 xq = is_quantized(w.type) ? quantize_act(x, n, w.cols, w.block) : ActQ8{};
  pool_.parallel_for(w.rows, matmul_chunk_rows(w, n, pool_.size()), [&](int64_t r0, int64_t r1) {
    if (n == 1) k_.matvec(w, x, xq, y, r0, r1);
    else k_.matmul(w, x, xq, n, y, w.rows, r0, r1);
  });
}

void Session::forward(const int32_t* tokens, int64_t n, bool all_logits, float* out) {
  const ModelConfig& c = model_->config();
  const int hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  const int n_heads = c.num_attention_heads, n_kv = c.num_key_value_heads, half = c.rotary_dim / 2;
  const int64_t qkv_rows = int64_t(n_heads + 2 * n_kv) * hd;

  // Positions, and cos/sin for them. LongRoPE picks its factors by this pass's sequence length.
  const bool long_factors = c.longrope && n_past_ + n > c.original_max_position_embeddings;
  const std::vector<float>& inv_freq = model_->inv_freq(long_factors);
  for (int64_t t = 0; t < n; ++t) {
    pos_[t] = n_past_ + t;
    for (int i = 0; i < half; ++i) {
      const float angle = float(pos_[t]) * inv_freq[i];
      cos_[t * half + i] = float(std::cos(double(angle))) * c.attention_factor;
      sin_[t * half + i] = float(std::sin(double(angle))) * c.attention_factor;
    }
  }

  for (int64_t t = 0; t < n; ++t) k_.dequant_row(model_->embed(), tokens[t], &x_[t * hidden]);

  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = model_->layers()[l];
    // Attention block: x += o_proj(attention(rope(qkv_proj(norm(x)))))
    for (int64_t t = 0; t < n; ++t) rmsnorm(&xn_[t * hidden], &x_[t * hidden], L.attn_norm, hidden, c.rms_norm_eps);
    matmul(L.qkv, xn_.data(), n, qkv_.data());
    for (int64_t t = 0; t < n; ++t) {
      float* row = &qkv_[t * qkv_rows];
      for (int h = 0; h < n_heads + n_kv; ++h) rope(row + h * hd, &cos_[t * half], &sin_[t * half], half);
    }
    attention(l, n);
    matmul(L.o, attn_.data(), n, proj_.data());
    for (int64_t i = 0; i < n * hidden; ++i) x_[i] += proj_[i];

    // MLP block: x += down(silu(gate) * up), gate and up from one fused projection.
    for (int64_t t = 0; t < n; ++t) rmsnorm(&xn_[t * hidden], &x_[t * hidden], L.mlp_norm, hidden, c.rms_norm_eps);
    matmul(L.gate_up, xn_.data(), n, gu_.data());
    pool_.run([&](int th, int nth) {
      int64_t t0, t1;
      split_range(n, th, nth, 1, t0, t1);
      for (int64_t t = t0; t < t1; ++t) k_.silu_mul(&gu_[t * 2 * inter], &gu_[t * 2 * inter + inter], &act_[t * inter], inter);
    });
    matmul(L.down, act_.data(), n, proj_.data());
    for (int64_t i = 0; i < n * hidden; ++i) x_[i] += proj_[i];
  }
  if (!out) return;

  // Final norm and the vocabulary projection: every row, or only the last.
  const int64_t first = all_logits ? 0 : n - 1;
  for (int64_t t = first; t < n; ++t) rmsnorm(&xn_[t * hidden], &x_[t * hidden], model_->final_norm(), hidden, c.rms_norm_eps);
  matmul(model_->lm_head(), &xn_[first * hidden], n - first, out);
}

// Causal grouped-query attention of this pass's n tokens over the cache. Writes each token's K and V
// first, then every (token, head) pair runs on some thread with its own score buffer.
void Session::attention(int layer, int64_t n) {
  const ModelConfig& c = model_->config();
  const int hd = c.head_dim, n_heads = c.num_attention_heads, n_kv = c.num_key_value_heads;
  const int64_t qkv_rows = int64_t(n_heads + 2 * n_kv) * hd;
  const int group = n_heads / n_kv;
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool f16 = kv_type_ == KVType::F16;
  auto kv_index = [&](int g, int64_t p) { return ((size_t(layer) * n_kv + g) * n_ctx_ + p) * hd; };

  for (int64_t t = 0; t < n; ++t) {
    const float* row = &qkv_[t * qkv_rows];
    for (int g = 0; g < n_kv; ++g) {
      const float* kr = row + (n_heads + g) * hd;
      const float* vr = row + (n_heads + n_kv + g) * hd;
      const size_t at = kv_index(g, pos_[t]);
      if (f16) {
        k_.to_f16(kr, &k_f16_[at], hd);
        k_.to_f16(vr, &v_f16_[at], hd);
      } else {
        std::copy(kr, kr + hd, &k_f32_[at]);
        std::copy(vr, vr + hd, &v_f32_[at]);
      }
    }
  }

  if (n >= kBlockedAttentionMin) return attention_blocked(layer, n);
  auto k_rows = [&](size_t base, int64_t len) {  // keys [0, len) of one kv head, a dense matrix
    WeightView kv;
    kv.type = f16 ? DType::F16 : DType::F32;
    kv.rows = len;
    kv.cols = hd;
    kv.codes = f16 ? reinterpret_cast<const uint8_t*>(&k_f16_[base]) : reinterpret_cast<const uint8_t*>(&k_f32_[base]);
    return kv;
  };

  pool_.run([&](int th, int nth) {
    int64_t w0, w1;
    split_range(n * n_heads, th, nth, 1, w0, w1);
    float* s = &scores_[size_t(th) * n_ctx_];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / n_heads;
      const int h = int(w % n_heads), g = h / group;
      const float* q = &qkv_[t * qkv_rows + h * hd];
      const int64_t len = pos_[t] + 1;
      const size_t base = kv_index(g, 0);
      k_.matvec(k_rows(base, len), q, ActQ8{}, s, 0, len);  // scores: one call over the K rows
      float mx = -INFINITY;
      for (int64_t j = 0; j < len; ++j) mx = std::max(mx, s[j] *= scale);
      const float inv = 1.0f / k_.exp_shift_sum(s, len, mx);
      for (int64_t j = 0; j < len; ++j) s[j] *= inv;
      float* o = &attn_[t * n_heads * hd + h * hd];
      std::fill(o, o + hd, 0.0f);
      if (f16) k_.axpy_rows_f16(s, &v_f16_[base], len, o, hd);
      else k_.axpy_rows_f32(s, &v_f32_[base], len, o, hd);
    }
  });
}

// Prefill attention as matrix products: per head, S = Q K^T over keys [0, n_past + n) with the
// matmul kernel (the KV cache rows are a dense f16 / f32 matrix), a causal softmax per row, then
// O = P V with V transposed once per kv head. The per-(token, key) dot and axpy calls of the
// decode path cost more than the whole matrix products here (SmolLM2 prefill spent most of its
// time in them). Heads are split across threads; queries go in chunks to bound the score buffer.
void Session::attention_blocked(int layer, int64_t n) {
  const ModelConfig& c = model_->config();
  const int hd = c.head_dim, n_heads = c.num_attention_heads, n_kv = c.num_key_value_heads;
  const int64_t qkv_rows = int64_t(n_heads + 2 * n_kv) * hd, keys = pos_[n - 1] + 1;
  const int group = n_heads / n_kv;
  const float scale = 1.0f / std::sqrt(float(hd));
  const bool f16 = kv_type_ == KVType::F16;
  constexpr int64_t kChunk = 64;  // queries per score block

  pool_.run([&](int th, int nth) {
    int64_t h0, h1;
    split_range(n_heads, th, nth, 1, h0, h1);
    AttentionScratch& sc = att_scratch_[size_t(th)];
    sc.q.resize(size_t(kChunk * hd));
    sc.s.resize(size_t(kChunk * keys));
    sc.vt.resize(size_t(hd * keys));
    int last_g = -1;
    for (int64_t h = h0; h < h1; ++h) {
      const int g = int(h) / group;
      const size_t base = ((size_t(layer) * n_kv + g) * n_ctx_) * hd;
      WeightView kv;  // K rows [keys][hd], then V^T [hd][keys]
      kv.type = f16 ? DType::F16 : DType::F32;
      kv.rows = keys;
      kv.cols = hd;
      kv.codes = f16 ? reinterpret_cast<const uint8_t*>(&k_f16_[base]) : reinterpret_cast<const uint8_t*>(&k_f32_[base]);
      WeightView vt;
      vt.type = DType::F32;
      vt.rows = hd;
      vt.cols = keys;
      vt.codes = reinterpret_cast<const uint8_t*>(sc.vt.data());
      if (g != last_g) {
        WeightView v = kv;
        v.codes = f16 ? reinterpret_cast<const uint8_t*>(&v_f16_[base]) : reinterpret_cast<const uint8_t*>(&v_f32_[base]);
        for (int64_t j = 0; j < keys; ++j) {
          k_.dequant_row(v, j, sc.q.data());  // q is free until the first chunk
          for (int d = 0; d < hd; ++d) sc.vt[size_t(d * keys + j)] = sc.q[size_t(d)];
        }
        last_g = g;
      }
      for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
        const int64_t m = std::min(kChunk, n - t0);
        for (int64_t t = 0; t < m; ++t)
          std::copy_n(&qkv_[(t0 + t) * qkv_rows + h * hd], hd, &sc.q[size_t(t * hd)]);
        k_.matmul(kv, sc.q.data(), ActQ8{}, m, sc.s.data(), keys, 0, keys);
        for (int64_t t = 0; t < m; ++t) {  // causal softmax of row t over keys [0, pos]
          float* row = &sc.s[size_t(t * keys)];
          const int64_t len = pos_[t0 + t] + 1;
          float mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) mx = std::max(mx, row[j] *= scale);
          const float inv = 1.0f / k_.exp_shift_sum(row, len, mx);
          for (int64_t j = 0; j < len; ++j) row[j] *= inv;
          std::fill(row + len, row + keys, 0.0f);
        }
        k_.matmul(vt, sc.s.data(), ActQ8{}, m, &attn_[t0 * n_heads * hd + h * hd], int64_t(n_heads) * hd, 0, hd);
      }
    }
  });
}

}  // namespace upg
