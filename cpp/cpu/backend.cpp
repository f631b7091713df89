#include "cpu/backend.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace upg {
namespace {

// out[i] = x[i] / rms(x) * w[i], the statistic in double (transformers computes it in float32).
void rmsnorm_row(float* out, const float* x, const float* w, int n, float eps) {
  double ss = 0;
  for (int i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float scale = float(1.0 / std::sqrt(ss / n + eps));
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * scale);
}

// Rotate-half (NeoX) RoPE on the first 2 * half dims of one head: pairs (i, i + half).
void rope_head(float* v, const float* cos, const float* sin, int half) {
  for (int i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i] + a * sin[i];
  }
}

}  // namespace

CpuBackend::CpuBackend(int n_threads) : k_(kernels()), pool_(n_threads) {
  att_scratch_.resize(size_t(pool_.size()));
}

Buf CpuBackend::weights(const void* data, size_t, uint64_t) {
  base_.push_back(static_cast<uint8_t*>(const_cast<void*>(data)));  // read-only: no op writes weights
  return Buf{int(base_.size() - 1), 0};
}

Buf CpuBackend::alloc(size_t bytes) {
  constexpr size_t kAlign = 64;  // SIMD rows
  owned_.emplace_back(new uint8_t[bytes + kAlign]());
  const uintptr_t p = reinterpret_cast<uintptr_t>(owned_.back().get());
  base_.push_back(reinterpret_cast<uint8_t*>((p + kAlign - 1) & ~uintptr_t(kAlign - 1)));
  return Buf{int(base_.size() - 1), 0};
}

void CpuBackend::upload(Buf dst, const void* src, size_t bytes) { std::memcpy(ptr(dst), src, bytes); }

void CpuBackend::begin(Buf pass) {
  const UpgPass* p = ptr<const UpgPass>(pass);
  const UpgSeq* q = reinterpret_cast<const UpgSeq*>(reinterpret_cast<const UpgToken*>(p + 1) + std::max(0, p->n_tokens));
  // The sequences must tile the pass's tokens: every op below trusts them.
  bool ok = p->n_tokens >= 1 && p->n_seqs >= 1 && p->n_seqs <= p->n_tokens && p->n_decode >= 0 && p->n_decode <= p->n_tokens;
  for (int32_t s = 0, next = 0; ok && s < p->n_seqs; next += q[s].n_tokens, ++s)
    ok = q[s].first == next && q[s].n_tokens >= 1 && q[s].n_past >= 0 && q[s].kv_base >= 0 &&
         (s + 1 < p->n_seqs || next + q[s].n_tokens == p->n_tokens);
  if (!ok) throw std::invalid_argument("cpu backend: the pass's sequences do not tile its tokens");
  pass_ = p;
  seqs_ = q;
  ++pass_count_;
}
void CpuBackend::download(void* dst, Buf src, size_t bytes) { std::memcpy(dst, ptr(src), bytes); }

WeightView CpuBackend::view(const Matrix& m) const {
  WeightView w;
  w.type = m.type;
  w.block = m.block;
  w.rows = m.rows;
  w.cols = m.cols;
  w.codes = ptr(m.data);
  set_sections(w);
  if (m.has_outliers()) {
    w.o_rowptr = ptr<const int32_t>(m.rowptr);
    w.o_col = ptr<const int32_t>(m.col);
    w.o_val = ptr<const uint16_t>(m.val);
  }
  return w;
}

void CpuBackend::get_rows(const Matrix& m, Buf ids, int n_tokens, Buf out) {
  const WeightView w = view(m);
  const int32_t* id = ptr<const int32_t>(ids);
  for (int t = 0; t < n_tokens; ++t) k_.dequant_row(w, id[t], ptr<float>(out) + int64_t(t) * w.cols);
}

void CpuBackend::rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) {
  for (int64_t t = 0; t < n_tokens; ++t)
    rmsnorm_row(ptr<float>(out) + t * n, ptr<const float>(x) + t * n, ptr<const float>(weight), n, eps);
}

// Quantized once per matmul, before the threads split the rows (each reads every token's row).
ActQ8 CpuBackend::quantize_act(const float* x, int64_t n, int64_t cols, int block) {
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

void CpuBackend::linear(const Matrix& m, Buf xb, int n, int n_dec, Buf yb) {
  const WeightView w = view(m);
  const float* x = ptr<const float>(xb);
  float* y = ptr<float>(yb);
  if (n_dec < 0 || n_dec > n) throw std::invalid_argument("linear: n_decode outside the call's rows");
  if (collect_) {
    ColumnSquares& c = squares_[m.data.offset];
    c.sum.resize(size_t(w.cols));
    for (int64_t t = 0; t < n; ++t)
      for (int64_t k = 0; k < w.cols; ++k) c.sum[size_t(k)] += double(x[t * w.cols + k]) * x[t * w.cols + k];
    c.rows += n;
  }
  if (capture_.count(m.data.offset)) {
    Inputs& in = inputs_[m.data.offset];
    in.cols = w.cols;
    in.x.insert(in.x.end(), x, x + n * w.cols);
  }
  const ActQ8 xq = is_quantized(w.type) ? quantize_act(x, n, w.cols, w.block) : ActQ8{};
  auto row_q = [&](int64_t t) {  // token t's row of the quantized input
    if (!xq.q) return ActQ8{};
    const int64_t nb = w.cols / w.block;
    return ActQ8{xq.block, xq.q + t * w.cols, xq.d + t * nb, xq.sum + t * nb};
  };
  // Generated rows: the mat-vec of every token over each group of rows (read from memory once),
  // in the summation order of a token alone.
  if (n_dec > 0)
    pool_.parallel_for(w.rows, matmul_chunk_rows(w, 1, pool_.size()), [&](int64_t r0, int64_t r1) {
      if (n_dec == 1) k_.matvec(w, x, xq, y, r0, r1);
      else k_.matvec_n(w, x, xq, n_dec, y, w.rows, r0, r1);
    });
  // Prompt rows: the mat-mat kernel, whose sums per row and token do not depend on the token count.
  const int64_t np = n - n_dec;
  if (np > 0)
    pool_.parallel_for(w.rows, matmul_chunk_rows(w, std::max<int64_t>(np, 2), pool_.size()), [&](int64_t r0, int64_t r1) {
      k_.matmul(w, x + n_dec * w.cols, row_q(n_dec), np, y + n_dec * w.rows, w.rows, r0, r1);
    });
}

void CpuBackend::rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& a) {
  const int half = a.rot_dims / 2;
  const int64_t n = a.n_tokens;
  const float* freq = ptr<const float>(inv_freq);
  // cos and sin of this pass's positions, computed once for all layers (in double, as before).
  if (rope_pass_ != pass_count_ || freq != rope_freq_) {
    cos_.resize(size_t(n * half));
    sin_.resize(size_t(n * half));
    for (int32_t s = 0; s < pass_->n_seqs; ++s) {
      const UpgSeq& q = seqs_[s];
      const float* f = freq + q.rope_set * half;
      for (int64_t t = q.first; t < q.first + q.n_tokens; ++t)
        for (int i = 0; i < half; ++i) {
          const float angle = float(q.n_past + t - q.first) * f[i];
          cos_[size_t(t * half + i)] = float(std::cos(double(angle))) * a.attn_factor;
          sin_[size_t(t * half + i)] = float(std::sin(double(angle))) * a.attn_factor;
        }
    }
    rope_pass_ = pass_count_, rope_freq_ = freq;
  }
  for (int64_t t = 0; t < n; ++t) {
    float* row = ptr<float>(qkv) + t * a.token_stride;
    for (int h = 0; h < a.n_heads; ++h) rope_head(row + h * a.head_dim, &cos_[size_t(t * half)], &sin_[size_t(t * half)], half);
  }
}

void CpuBackend::kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& a) {
  const int hd = a.head_dim;
  for (int32_t s = 0; s < pass_->n_seqs; ++s) {
    const UpgSeq& q = seqs_[s];
    if (int64_t(q.kv_base) + q.n_past + q.n_tokens > a.kv_stride) throw std::invalid_argument("kv_store: past the cache");
    for (int64_t i = 0; i < q.n_tokens; ++i) {
      const float* row = ptr<const float>(qkv) + (q.first + i) * a.q_stride;
      for (int g = 0; g < a.n_kv_heads; ++g) {
        const float* kr = row + (a.n_heads + g) * hd;
        const float* vr = row + (a.n_heads + a.n_kv_heads + g) * hd;
        const size_t at = (size_t(g) * a.kv_stride + size_t(q.kv_base + q.n_past + i)) * hd;
        if (f16) {
          k_.to_f16(kr, ptr<uint16_t>(k_cache) + at, hd);
          k_.to_f16(vr, ptr<uint16_t>(v_cache) + at, hd);
        } else {
          std::copy(kr, kr + hd, ptr<float>(k_cache) + at);
          std::copy(vr, vr + hd, ptr<float>(v_cache) + at);
        }
      }
    }
  }
}

// Causal grouped-query attention of each sequence's tokens over its slot of the cache: the
// generated tokens of every sequence together (decode), then each prompt's tokens (blocked).
void CpuBackend::attention(Buf qkv_b, Buf k_cache, Buf v_cache, Buf out_b, bool f16, const UpgAttnArgs& a) {
  const float* qkv = ptr<const float>(qkv_b);
  float* out = ptr<float>(out_b);
  const size_t elem = f16 ? 2 : 4;
  if (pass_->n_decode > 0) attention_decode(qkv, k_cache, v_cache, out, f16, a);
  for (int32_t s = 0; s < pass_->n_seqs; ++s) {
    const UpgSeq& q = seqs_[s];
    if (q.first < pass_->n_decode) continue;
    UpgAttnArgs one = a;
    one.n_tokens = q.n_tokens;
    const size_t base = size_t(q.kv_base) * a.head_dim * elem;
    attention_blocked(qkv + int64_t(q.first) * a.q_stride, ptr(k_cache) + base, ptr(v_cache) + base,
                      out + int64_t(q.first) * a.n_heads * a.head_dim, q.n_past, f16, one);
  }
}

// Every (generated token, KV head) pair runs on some thread with its own score buffers: the scores
// of the KV head's query heads in one pass over its K rows (matvec_n: each head's sums as a
// matvec gives them for it alone), then each head's softmax and P V.
void CpuBackend::attention_decode(const float* qkv, Buf k_cache, Buf v_cache, float* out, bool f16, const UpgAttnArgs& a) {
  const int hd = a.head_dim, n_heads = a.n_heads, group = a.n_heads / a.n_kv_heads;
  const int64_t n = pass_->n_decode;
  // the sequence of each generated token, and the longest key run
  std::vector<int32_t> seq_of(static_cast<size_t>(n));
  int64_t keys = 0;
  for (int32_t s = 0; s < pass_->n_seqs && seqs_[s].first < n; ++s) {
    const UpgSeq& q = seqs_[s];
    for (int32_t i = 0; i < q.n_tokens; ++i) seq_of[size_t(q.first + i)] = s;
    keys = std::max<int64_t>(keys, int64_t(q.n_past) + q.n_tokens);
  }
  const int64_t per_thread = int64_t(group) * keys;
  if (scores_.size() < size_t(pool_.size() * per_thread)) scores_.resize(size_t(pool_.size() * per_thread));
  const size_t elem = f16 ? 2 : 4;
  pool_.run([&](int th, int nth) {
    int64_t w0, w1;
    split_range(n * a.n_kv_heads, th, nth, 1, w0, w1);
    float* scores = &scores_[size_t(th * per_thread)];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / a.n_kv_heads;
      const UpgSeq& q = seqs_[seq_of[size_t(t)]];
      const int g = int(w % a.n_kv_heads);
      const int64_t len = q.n_past + (t - q.first) + 1;
      const size_t base = (size_t(g) * a.kv_stride + size_t(q.kv_base)) * hd;
      WeightView kv;  // keys [0, len) of one kv head in this slot, a dense matrix
      kv.type = f16 ? DType::F16 : DType::F32;
      kv.rows = len;
      kv.cols = hd;
      kv.codes = ptr(k_cache) + base * elem;
      // scores of the group's heads, head j's at scores + j * len
      k_.matvec_n(kv, qkv + t * a.q_stride + int64_t(g) * group * hd, ActQ8{}, group, scores, len, 0, len);
      for (int j = 0; j < group; ++j) {
        float* s = scores + int64_t(j) * len;
        float mx = -INFINITY;
        for (int64_t i = 0; i < len; ++i) mx = std::max(mx, s[i] *= a.scale);
        const float inv = 1.0f / k_.exp_shift_sum(s, len, mx);
        for (int64_t i = 0; i < len; ++i) s[i] *= inv;
        float* o = out + t * n_heads * hd + (int64_t(g) * group + j) * hd;
        std::fill(o, o + hd, 0.0f);
        if (f16) k_.axpy_rows_f16(s, ptr<const uint16_t>(v_cache) + base, len, o, hd);
        else k_.axpy_rows_f32(s, ptr<const float>(v_cache) + base, len, o, hd);
      }
    }
  });
}

// Prefill attention as matrix products: per head, S = Q K^T over keys [0, n_past + n) with the
// matmul kernel (the KV cache rows are a dense f16 / f32 matrix), a causal softmax per row, then
// O = P V with V transposed once per kv head. The per-(token, key) dot and axpy calls of the
// decode path cost more than the whole matrix products here (SmolLM2 prefill spent most of its
// time in them). Heads are split across threads; queries go in chunks to bound the score buffer.
void CpuBackend::attention_blocked(const float* qkv, const uint8_t* k_cache, const uint8_t* v_cache, float* out,
                                   int64_t n_past, bool f16, const UpgAttnArgs& a) {
  const int hd = a.head_dim, n_heads = a.n_heads, group = a.n_heads / a.n_kv_heads;
  const int64_t n = a.n_tokens, keys = n_past + n;
  const size_t elem = f16 ? 2 : 4;
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
      const size_t base = size_t(g) * a.kv_stride * hd * elem;
      WeightView kv;  // K rows [keys][hd], then V^T [hd][keys]
      kv.type = f16 ? DType::F16 : DType::F32;
      kv.rows = keys;
      kv.cols = hd;
      kv.codes = k_cache + base;
      WeightView vt;
      vt.type = DType::F32;
      vt.rows = hd;
      vt.cols = keys;
      vt.codes = reinterpret_cast<const uint8_t*>(sc.vt.data());
      if (g != last_g) {
        WeightView v = kv;
        v.codes = v_cache + base;
        for (int64_t j = 0; j < keys; ++j) {
          k_.dequant_row(v, j, sc.q.data());  // q is free until the first chunk
          for (int d = 0; d < hd; ++d) sc.vt[size_t(d * keys + j)] = sc.q[size_t(d)];
        }
        last_g = g;
      }
      for (int64_t t0 = 0; t0 < n; t0 += kChunk) {
        const int64_t m = std::min(kChunk, n - t0);
        for (int64_t t = 0; t < m; ++t) std::copy_n(qkv + (t0 + t) * a.q_stride + h * hd, hd, &sc.q[size_t(t * hd)]);
        k_.matmul(kv, sc.q.data(), ActQ8{}, m, sc.s.data(), keys, 0, keys);
        for (int64_t t = 0; t < m; ++t) {  // causal softmax of row t over keys [0, pos]
          float* row = &sc.s[size_t(t * keys)];
          const int64_t len = n_past + t0 + t + 1;
          float mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) mx = std::max(mx, row[j] *= a.scale);
          const float inv = 1.0f / k_.exp_shift_sum(row, len, mx);
          for (int64_t j = 0; j < len; ++j) row[j] *= inv;
          std::fill(row + len, row + keys, 0.0f);
        }
        k_.matmul(vt, sc.s.data(), ActQ8{}, m, out + t0 * n_heads * hd + h * hd, int64_t(n_heads) * hd, 0, hd);
      }
    }
  });
}

void CpuBackend::silu_mul(Buf gate_up, Buf out, int n, int inter) {
  const float* gu = ptr<const float>(gate_up);
  float* act = ptr<float>(out);
  pool_.run([&](int th, int nth) {
    int64_t t0, t1;
    split_range(n, th, nth, 1, t0, t1);
    for (int64_t t = t0; t < t1; ++t) k_.silu_mul(gu + t * 2 * inter, gu + t * 2 * inter + inter, act + t * inter, inter);
  });
}

void CpuBackend::add(Buf xb, Buf yb, int n) {
  float* x = ptr<float>(xb);
  const float* y = ptr<const float>(yb);
  for (int i = 0; i < n; ++i) x[i] += y[i];
}

void CpuBackend::argmax(Buf xb, int n, Buf out) {
  const float* x = ptr<const float>(xb);
  *ptr<int32_t>(out) = int32_t(std::max_element(x, x + n) - x);
}

void CpuBackend::next_token(Buf pass, Buf tokens, Buf out) {
  UpgPass* p = ptr<UpgPass>(pass);
  UpgToken* t = reinterpret_cast<UpgToken*>(p + 1);
  UpgSeq* s = reinterpret_cast<UpgSeq*>(t + p->n_tokens);
  ptr<int32_t>(out)[p->n_past] = *ptr<const int32_t>(tokens);
  ++p->n_past, ++t->pos, ++s->n_past;
}

}  // namespace upg
