#include "upg/graph.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

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

Graph::Graph(const Model& model, int n_ctx, int n_batch, KVType kv_type, int n_slots)
    : model_(model), n_ctx_(n_ctx), n_batch_(n_batch), n_slots_(n_slots), kv_type_(kv_type) {
  if (n_ctx < 1) throw std::invalid_argument("n_ctx must be at least 1");
  if (n_batch < 1) throw std::invalid_argument("n_batch must be at least 1");
  if (n_slots < 1) throw std::invalid_argument("n_slots must be at least 1");
  if (int64_t(n_slots) * n_ctx > INT32_MAX) throw std::invalid_argument("n_slots x n_ctx positions exceed 2^31");
}

uint64_t Graph::layer_kv_bytes() const {
  const ModelConfig& c = model_.config();
  return uint64_t(c.num_key_value_heads) * uint64_t(n_slots_) * uint64_t(n_ctx_) * c.head_dim * kv_elem_bytes();
}

std::vector<uint64_t> Graph::buffer_sizes() const {
  const ModelConfig& c = model_.config();
  const uint64_t nb = uint64_t(n_batch_), hd = uint64_t(c.head_dim);
  const uint64_t qkv_rows = uint64_t(c.num_attention_heads + 2 * c.num_key_value_heads) * hd;
  std::vector<uint64_t> s(kBufferCount);
  s[kTokens] = 4 * nb;
  s[kPass] = sizeof(UpgPass) + nb * (sizeof(UpgToken) + sizeof(UpgSeq));
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

std::vector<Buf> Graph::alloc(Backend& be) const {
  std::vector<Buf> buffers;
  for (uint64_t bytes : buffer_sizes()) buffers.push_back(be.alloc(bytes));
  const std::vector<float> inv_freq = inv_freq_table();
  be.upload(buffers[kInvFreq], inv_freq.data(), inv_freq.size() * sizeof(float));
  return buffers;
}

std::vector<float> Graph::inv_freq_table() const {
  std::vector<float> t(model_.inv_freq(false));
  const std::vector<float>& long_set = model_.inv_freq(true);
  t.insert(t.end(), long_set.begin(), long_set.end());
  return t;
}

int Graph::Pass::n_tokens() const {
  int n = 0;
  for (const Seq& q : seqs) n += q.n_tokens;
  return n;
}

std::vector<uint8_t> Graph::pass_bytes(const Pass& p) const {
  const int n = p.n_tokens();
  if (p.seqs.empty() || n > n_batch_) throw std::invalid_argument("graph: a pass holds 1 to n_batch tokens");
  std::vector<UpgSeq> seqs;
  bool split = p.n_decode < 0 || p.n_decode > n;
  int first = 0;
  for (const Seq& q : p.seqs) {
    if (q.n_tokens < 1) throw std::invalid_argument("graph: a sequence of the pass has no tokens");
    if (q.slot < 0 || q.slot >= n_slots_) throw std::invalid_argument("graph: no such KV slot");
    if (q.n_past < 0 || int64_t(q.n_past) + q.n_tokens > n_ctx_) throw std::invalid_argument("graph: the tokens do not fit");
    split |= first < p.n_decode && first + q.n_tokens > p.n_decode;
    // LongRoPE picks its factors by the sequence length this pass reaches: in a pass of one
    // sequence by the set forward() hands the op, in a batch by each sequence's rope_set.
    const int rope_set = p.seqs.size() > 1 && model_.long_factors(q.n_past + q.n_tokens) ? 1 : 0;
    seqs.push_back(UpgSeq{first, q.n_tokens, q.n_past, q.slot * n_ctx_, rope_set, {0, 0, 0}});
    first += q.n_tokens;
  }
  if (split) throw std::invalid_argument("graph: n_decode must end on a sequence boundary");
  std::vector<UpgToken> toks;
  for (size_t s = 0; s < seqs.size(); ++s)
    for (int i = 0; i < seqs[s].n_tokens; ++i)
      toks.push_back(UpgToken{seqs[s].n_past + i, seqs[s].kv_base, seqs[s].rope_set, int32_t(s)});
  const UpgPass head{seqs[0].n_past, n, int32_t(seqs.size()), p.n_decode};
  const size_t tok_bytes = toks.size() * sizeof(UpgToken), seq_bytes = seqs.size() * sizeof(UpgSeq);
  std::vector<uint8_t> out(sizeof head + tok_bytes + seq_bytes);
  std::memcpy(out.data(), &head, sizeof head);
  std::memcpy(out.data() + sizeof head, toks.data(), tok_bytes);
  std::memcpy(out.data() + sizeof head + tok_bytes, seqs.data(), seq_bytes);
  return out;
}

void Graph::forward(Backend& be, Buf weights, const std::vector<Buf>& buffers, const Pass& p) const {
  const ModelConfig& c = model_.config();
  if (buffers.size() != kBufferCount) throw std::invalid_argument("graph: one buffer per Graph::BufferId");
  const int n = p.n_tokens();
  if (n < 1 || n > n_batch_) throw std::invalid_argument("graph: the tokens do not fit");
  const int hidden = c.hidden_size, hd = c.head_dim, nh = c.num_attention_heads, nkv = c.num_key_value_heads;
  const int qkv_rows = (nh + 2 * nkv) * hd;
  const Buf x = buffers[kX], xn = buffers[kXn], qkv = buffers[kQkv], attn = buffers[kAttn], gu = buffers[kGateUp],
            act = buffers[kAct], proj = buffers[kProj];
  const bool f16 = kv_type_ == KVType::F16;
  const int n_dec = p.n_decode;

  const Seq& s0 = p.seqs[0];
  const bool long_set = p.seqs.size() == 1 && model_.long_factors(s0.n_past + s0.n_tokens);
  const Buf inv_freq = buffers[kInvFreq].at(long_set ? 2 * uint64_t(c.rotary_dim) : 0);
  const UpgRopeArgs rope{n, nh + nkv, hd, c.rotary_dim, qkv_rows, c.attention_factor};
  const UpgAttnArgs att{nh, nkv, hd, n_slots_ * n_ctx_, qkv_rows, n, 1.0f / std::sqrt(float(hd)),
                        n_dec, int(p.seqs.size()), n_ctx_};

  be.get_rows(place(model_.embed(), weights), buffers[kTokens], n, x);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = model_.layers()[size_t(l)];
    const Buf kc = buffers[kKCache].at(l * layer_kv_bytes()), vc = buffers[kVCache].at(l * layer_kv_bytes());
    // Attention block: x += o_proj(attention(rope(qkv_proj(norm(x)))))
    be.norm_linear(x, place(L.attn_norm, weights), c.rms_norm_eps, xn, place(L.qkv, weights), n, n_dec, qkv);
    be.rope(qkv, inv_freq, rope);
    be.kv_store(qkv, kc, vc, f16, att);
    be.attention(qkv, kc, vc, attn, f16, att);
    be.linear_add(place(L.o, weights), attn, n, n_dec, proj, x);
    // MLP block: x += down(silu(gate) * up), gate and up from one fused projection.
    be.norm_linear(x, place(L.mlp_norm, weights), c.rms_norm_eps, xn, place(L.gate_up, weights), n, n_dec, gu);
    be.silu_linear_add(place(L.down, weights), gu, n, n_dec, act, proj, x);
  }
  if (p.output == Output::kNone) return;
  // Final norm of every row, then the vocabulary projection of the rows asked for.
  be.rms_norm(x, place(model_.final_norm(), weights), xn, n, hidden, c.rms_norm_eps);
  if (p.output == Output::kHidden) return;
  uint64_t row = 0;
  for (const Rows& r : p.logits) {
    if (r.first < 0 || r.count < 1 || r.first + r.count > n) throw std::invalid_argument("graph: logits rows outside the pass");
    const int dec = std::max(0, std::min(n_dec - r.first, r.count));
    be.linear(place(model_.lm_head(), weights), xn.at(uint64_t(4) * r.first * hidden), r.count, dec,
              buffers[kLogits].at(uint64_t(4) * row * c.vocab_size));
    row += uint64_t(r.count);
  }
  for (size_t i = 0; i < p.argmax_rows.size(); ++i) {
    if (p.argmax_rows[i] < 0 || uint64_t(p.argmax_rows[i]) >= row || i >= size_t(n))
      throw std::invalid_argument("graph: an argmax row outside the pass's logits");
    be.argmax(buffers[kLogits].at(uint64_t(4) * uint64_t(p.argmax_rows[i]) * c.vocab_size), c.vocab_size,
              buffers[kTokens].at(uint64_t(4) * i));
  }
  if (p.output != Output::kGreedy) return;
  if (p.seqs.size() != 1 || n != 1 || n_dec != 1 || p.logits.size() != 1)
    throw std::invalid_argument("graph: greedy decoding takes one generated token of one sequence, its logits");
  be.argmax(buffers[kLogits], c.vocab_size, buffers[kTokens]);
  be.next_token(buffers[kPass], buffers[kTokens], buffers[kGenerated]);
}

void Graph::run(Backend& be, Buf weights, const std::vector<Buf>& buffers, const int32_t* tokens, const Pass& p) const {
  const std::vector<uint8_t> pass = pass_bytes(p);
  if (p.seqs.size() > size_t(be.max_seqs()))
    throw std::invalid_argument(std::string("the ") + be.name() + " backend runs passes of one sequence only");
  be.upload(buffers[kTokens], tokens, size_t(p.n_tokens()) * sizeof(int32_t));
  be.upload(buffers[kPass], pass.data(), pass.size());
  be.begin(buffers[kPass]);
  forward(be, weights, buffers, p);
  be.end();
}

}  // namespace upg
