#include "graph.h"

#include <cmath>
#include <stdexcept>

namespace upg::metal {

Graph::Graph(const Model& model, int n_ctx, int n_batch, bool kv_f16)
    : model_(model), data_(model.file().data_section()), n_ctx_(n_ctx), n_batch_(n_batch), kv_f16_(kv_f16) {
  if (n_ctx < 1 || n_batch < 1) throw std::invalid_argument("metal: n_ctx and n_batch must be at least 1");
}

std::vector<uint64_t> Graph::buffer_sizes() const {
  const ModelConfig& c = model_.config();
  const uint64_t nb = uint64_t(n_batch_), hd = uint64_t(c.head_dim);
  const uint64_t qkv_rows = uint64_t(c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
  const uint64_t kv = uint64_t(c.num_hidden_layers) * c.num_key_value_heads * uint64_t(n_ctx_) * hd * (kv_f16_ ? 2 : 4);
  std::vector<uint64_t> s(kBufferCount);
  s[kWeights] = model_.file().file_size() - model_.file().data_offset();
  s[kTokenIds] = 4 * nb;
  s[kX] = s[kXn] = s[kProj] = 4 * nb * c.hidden_size;
  s[kQkv] = 4 * nb * qkv_rows;
  s[kAttn] = 4 * nb * c.num_attention_heads * hd;
  s[kGateUp] = 8 * nb * c.intermediate_size;
  s[kAct] = 4 * nb * c.intermediate_size;
  s[kKCache] = s[kVCache] = kv;
  s[kLogits] = 4 * nb * c.vocab_size;
  s[kRopeFactors] = 4 * (c.short_factor.size() + c.long_factor.size()) + 16;
  return s;
}

std::vector<float> Graph::rope_factors() const {
  const ModelConfig& c = model_.config();
  std::vector<float> f(c.short_factor);
  f.insert(f.end(), c.long_factor.begin(), c.long_factor.end());
  return f;
}

Buf Graph::weight(const void* p, Buf weights) const {
  return weights.at(uint64_t(static_cast<const uint8_t*>(p) - data_));
}

Matrix Graph::matrix(const WeightView& w, Buf weights) const {
  Matrix m;
  m.type = w.type;
  m.block = w.block;
  m.rows = w.rows;
  m.cols = w.cols;
  m.data = weight(w.codes, weights);
  if (w.o_rowptr) {
    m.rowptr = weight(w.o_rowptr, weights);
    m.col = weight(w.o_col, weights);
    m.val = weight(w.o_val, weights);
  }
  return m;
}

void Graph::forward(Ops& ops, const std::vector<Buf>& buffers, int n, int n_past, bool all_logits) const {
  const ModelConfig& c = model_.config();
  if (n < 1 || n > n_batch_ || n_past + n > n_ctx_) throw std::invalid_argument("metal: the tokens do not fit");
  const int hidden = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int inter = c.intermediate_size, qkv_rows = (nh + 2 * nkv) * hd;
  if (buffers.size() != kBufferCount) throw std::invalid_argument("metal: one buffer per Graph::BufferId");
  const Buf x = buffers[kX], xn = buffers[kXn], qkv = buffers[kQkv], attn = buffers[kAttn], gu = buffers[kGateUp],
            act = buffers[kAct], proj = buffers[kProj], wts = buffers[kWeights];
  // Decode multiplies with mat-vec kernels, prefill with mat-mat ones (y rows of ldy = rows).
  auto linear = [&](const WeightView& w, Buf in, int tokens, Buf out) {
    if (tokens == 1) ops.matvec(matrix(w, wts), in, out);
    else ops.matmul(matrix(w, wts), in, tokens, out, int(w.rows));
  };

  ops.get_rows(matrix(model_.embed(), wts), buffers[kTokenIds], n, x);
  const bool long_factors = c.longrope && n_past + n > c.original_max_position_embeddings;
  const Buf factors = c.longrope ? buffers[kRopeFactors].at(long_factors ? 4 * c.short_factor.size() : 0) : Buf{};
  const UpgRopeArgs rope{n, nh + nkv, hd, c.rotary_dim, qkv_rows, n_past, c.rope_theta, c.attention_factor,
                         int32_t(c.longrope)};
  // kv_store appends at n_past; decode attends n_past + 1 positions, prefill token t n_past + t + 1.
  UpgAttnArgs store{nh, nkv, hd, n_past, n_ctx_, qkv_rows, n, 1.0f / std::sqrt(float(hd))};
  UpgAttnArgs attend = store;
  if (n == 1) attend.n_kv = n_past + 1;
  const uint64_t layer_kv = uint64_t(nkv) * n_ctx_ * hd * (kv_f16_ ? 2 : 4);

  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = model_.layers()[size_t(l)];
    const Buf kc = buffers[kKCache].at(l * layer_kv), vc = buffers[kVCache].at(l * layer_kv);
    ops.rms_norm(x, weight(L.attn_norm, wts), xn, n, hidden, c.rms_norm_eps);
    linear(L.qkv, xn, n, qkv);
    ops.rope(qkv, factors, rope);
    ops.kv_store(qkv, kc, vc, kv_f16_, store);
    ops.attention(qkv, kc, vc, attn, kv_f16_, n > 1, attend);
    linear(L.o, attn, n, proj);
    ops.add(x, proj, n * hidden);
    ops.rms_norm(x, weight(L.mlp_norm, wts), xn, n, hidden, c.rms_norm_eps);
    linear(L.gate_up, xn, n, gu);
    ops.silu_mul(gu, act, n, inter, 2 * inter);
    linear(L.down, act, n, proj);
    ops.add(x, proj, n * hidden);
  }
  const int first = all_logits ? 0 : n - 1;
  ops.rms_norm(x.at(uint64_t(4) * first * hidden), weight(model_.final_norm(), wts), xn, n - first, hidden,
               c.rms_norm_eps);
  linear(model_.lm_head(), xn, n - first, buffers[kLogits]);
}

}  // namespace upg::metal
