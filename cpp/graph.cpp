#include "upg/graph.h"

#include <cmath>
#include <stdexcept>

namespace upg {
namespace {

// The weights as the model locates them (offsets in the data section), inside `weights`.
Buf place(Buf rel, Buf weights) { return rel.valid() ? weights.at(rel.offset) : rel; }

Matrix place(Matrix m, Buf weights) {
  m.data = place(m.data, weights);
  m.rowptr = place(m.rowptr, weights);
  m.col = place(m.col, weights);
  m.val = place(m.val, weights);
  return m;
}

}  // namespace

Graph::Graph(const Model& model, int n_ctx, int n_batch, KVType kv_type)
    : model_(model), n_ctx_(n_ctx), n_batch_(n_batch), kv_type_(kv_type) {
  if (n_ctx < 1) throw std::invalid_argument("n_ctx must be at least 1");
  if (n_batch < 1) throw std::invalid_argument("n_batch must be at least 1");
}

uint64_t Graph::layer_kv_bytes() const {
  const ModelConfig& c = model_.config();
  return uint64_t(c.num_key_value_heads) * uint64_t(n_ctx_) * c.head_dim * kv_elem_bytes();
}

std::vector<uint64_t> Graph::buffer_sizes() const {
  const ModelConfig& c = model_.config();
  const uint64_t nb = uint64_t(n_batch_), hd = uint64_t(c.head_dim);
  const uint64_t qkv_rows = uint64_t(c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
  std::vector<uint64_t> s(kBufferCount);
  s[kTokens] = 4 * nb;
  s[kPass] = sizeof(UpgPass);
  s[kInvFreq] = 4 * uint64_t(c.rotary_dim);  // two sets of rotary_dim / 2
  s[kX] = s[kXn] = s[kProj] = 4 * nb * c.hidden_size;
  s[kQkv] = 4 * nb * qkv_rows;
  s[kAttn] = 4 * nb * c.num_attention_heads * hd;
  s[kGateUp] = 8 * nb * c.intermediate_size;
  s[kAct] = 4 * nb * c.intermediate_size;
  s[kKCache] = s[kVCache] = uint64_t(c.num_hidden_layers) * layer_kv_bytes();
  s[kLogits] = 4 * nb * c.vocab_size;
  s[kGenerated] = 4 * uint64_t(n_ctx_);
  return s;
}

std::vector<float> Graph::inv_freq_table() const {
  std::vector<float> t(model_.inv_freq(false));
  const std::vector<float>& long_set = model_.inv_freq(true);
  t.insert(t.end(), long_set.begin(), long_set.end());
  return t;
}

void Graph::forward(Backend& be, Buf weights, const std::vector<Buf>& buffers, int n, int n_past, Output output) const {
  const ModelConfig& c = model_.config();
  if (buffers.size() != kBufferCount) throw std::invalid_argument("graph: one buffer per Graph::BufferId");
  if (n < 1 || n > n_batch_ || n_past < 0 || n_past + n > n_ctx_) throw std::invalid_argument("graph: the tokens do not fit");
  const int hidden = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int inter = c.intermediate_size, qkv_rows = (nh + 2 * nkv) * hd;
  const Buf x = buffers[kX], xn = buffers[kXn], qkv = buffers[kQkv], attn = buffers[kAttn], gu = buffers[kGateUp],
            act = buffers[kAct], proj = buffers[kProj];
  const bool f16 = kv_type_ == KVType::F16;

  // LongRoPE picks its factors by the sequence length this pass reaches.
  const Buf inv_freq = buffers[kInvFreq].at(model_.long_factors(n_past + n) ? 2 * uint64_t(c.rotary_dim) : 0);
  const UpgRopeArgs rope{n, nh + nkv, hd, c.rotary_dim, qkv_rows, c.attention_factor};
  const UpgAttnArgs att{nh, nkv, hd, n_ctx_, qkv_rows, n, 1.0f / std::sqrt(float(hd))};

  be.get_rows(place(model_.embed(), weights), buffers[kTokens], n, x);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = model_.layers()[size_t(l)];
    const Buf kc = buffers[kKCache].at(l * layer_kv_bytes()), vc = buffers[kVCache].at(l * layer_kv_bytes());
    // Attention block: x += o_proj(attention(rope(qkv_proj(norm(x)))))
    be.rms_norm(x, place(L.attn_norm, weights), xn, n, hidden, c.rms_norm_eps);
    be.linear(place(L.qkv, weights), xn, n, qkv);
    be.rope(qkv, inv_freq, rope);
    be.kv_store(qkv, kc, vc, f16, att);
    be.attention(qkv, kc, vc, attn, f16, att);
    be.linear(place(L.o, weights), attn, n, proj);
    be.add(x, proj, n * hidden);
    // MLP block: x += down(silu(gate) * up), gate and up from one fused projection.
    be.rms_norm(x, place(L.mlp_norm, weights), xn, n, hidden, c.rms_norm_eps);
    be.linear(place(L.gate_up, weights), xn, n, gu);
    be.silu_mul(gu, act, n, inter);
    be.linear(place(L.down, weights), act, n, proj);
    be.add(x, proj, n * hidden);
  }
  if (output == Output::kNone) return;
  // Final norm of every row, then the vocabulary projection of every row or only the last.
  be.rms_norm(x, place(model_.final_norm(), weights), xn, n, hidden, c.rms_norm_eps);
  if (output == Output::kHidden) return;
  const int first = output == Output::kAllLogits ? 0 : n - 1;
  be.linear(place(model_.lm_head(), weights), xn.at(uint64_t(4) * first * hidden), n - first, buffers[kLogits]);
  if (output != Output::kGreedy) return;
  be.argmax(buffers[kLogits], c.vocab_size, buffers[kTokens]);
  be.next_token(buffers[kPass], buffers[kTokens], buffers[kGenerated]);
}

}  // namespace upg
