// The seam between the one graph (graph.h) and the machines that run it. A Backend owns its
// buffers and implements the ops the graph calls; the graph never touches a buffer's bytes. Host
// and backend exchange bytes only through upload() and download(): tokens and per-pass values in,
// logits out, the KV cache for saved states.
//
// Backends: cpu/backend.h (the CPU kernels, threads, 8-bit activations for quantized weights),
// metal/backend.h (Metal launches; weights wrapped zero-copy in shared memory), cuda/backend.h
// (CUDA launches recorded per pass and replayed as CUDA graphs).
#pragma once
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "upg/quant.h"
#include "upg/sampler.h"

namespace upg {

// A range of one backend buffer: id is the backend's handle (-1: none), offset in bytes.
struct Buf {
  int id = -1;
  uint64_t offset = 0;
  Buf at(uint64_t bytes) const { return Buf{id, offset + bytes}; }
  bool valid() const { return id >= 0; }
};

// A weight matrix [rows, cols] of any UPG type inside the weights buffer: its first byte (the
// type's sections follow, FORMAT.md) and the optional CSR outliers (rowptr i32 [rows + 1], col i32
// [nnz], val f16 [nnz]; rowptr.id -1 when absent).
struct Matrix {
  DType type = DType::F32;
  int block = 0;               // elements per scale block (quantized types), else 0
  int64_t rows = 0, cols = 0;
  Buf data, rowptr, col, val;
  bool has_outliers() const { return rowptr.valid(); }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;  // "cpu", "metal"
  // Sequences one pass may hold (UpgPass::n_seqs): every backend today takes any number.
  virtual int max_seqs() const { return 1; }

  // ---- memory ----
  // The model's weights, [data, data + bytes) of the mapped file (16 KiB aligned and sized):
  // wrapped without a copy where the backend shares host memory, else uploaded once for each
  // device: `content` names the bytes (UPGFile::content_id), and the sessions of one content on
  // one device share a copy (a server's Llama and its BatchSession). The memory outlives the
  // backend's use of it.
  virtual Buf weights(const void* data, size_t bytes, uint64_t content) = 0;
  virtual Buf alloc(size_t bytes) = 0;  // zero-filled
  virtual void upload(Buf dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, Buf src, size_t bytes) = 0;

  // A pass: the ops between begin() and end() run in order, and those that depend on the
  // position read it from `pass` (an UpgPass and its UpgToken and UpgSeq entries, uploaded before
  // begin, or what the previous pass's next_token left), so the same calls serve every position.
  // end() may return before the pass has run (a GPU queues it); upload() and download() are
  // ordered after every pass ended before them and return when their bytes have moved. They are
  // called outside a pass.
  virtual void begin(Buf pass) = 0;
  virtual void end() {}

  // ---- ops, in the order the graph calls them; every float buffer is row-major by token ----
  // An op's n_tokens is the pass's token count (UpgPass), except linear's, which may also be a run
  // of the pass's rows (the rows whose logits are asked for). The position-dependent ops (rope,
  // kv_store, attention) take each token's sequence, slot and position from the pass's UpgSeq
  // entries.
  // out[t] = row ids[t] of w (embedding lookup, outliers included); ids: int32 [n_tokens].
  virtual void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) = 0;
  // out[t] = x[t] / rms(x[t]) * weight, rows of n floats.
  virtual void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) = 0;
  // y[t][r] = sum_k W[r][k] x[t][k], y rows of w.rows floats. The backend chooses the kernels
  // and the activation rounding. Rows [0, n_decode) are generated tokens: a backend that keeps
  // results batch-invariant computes each kind of row by the same kernels whatever the call's
  // token count (the CPU and CUDA: mat-vec for generated rows, mat-mat for prompt rows; Metal the same,
  // one mat-vec launch per generated row).
  virtual void linear(const Matrix& w, Buf x, int n_tokens, int n_decode, Buf y) = 0;
  // RoPE in place over the query and key heads at each token's position (upg_common.h
  // UpgRopeArgs); inv_freq: f32 [rot_dims / 2], then the long set for UpgSeq::rope_set 1.
  virtual void rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& args) = 0;
  // Stores the pass's K and V heads (rows of qkv) in one layer's cache at each token's position.
  virtual void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) = 0;
  // Causal grouped-query attention of each token's query over its sequence's slot of one layer's
  // cache: out [n_tokens][n_heads * head_dim]. The backend chooses its decode and prefill paths
  // (the CPU: by the kind of token, UpgPass::n_decode, never by how many tokens the pass holds).
  virtual void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& args) = 0;
  // out[t][i] = silu(gate_up[t][i]) * gate_up[t][n + i]: rows of 2n floats in, n out.
  virtual void silu_mul(Buf gate_up, Buf out, int n_tokens, int n) = 0;
  virtual void add(Buf x, Buf y, int n) = 0;  // x += y over n floats

  // ---- the graph's runs of ops that a backend may do in one launch; by default, the ops above ----
  // Each computes exactly what its ops compute (a backend that fuses them keeps their bits); the
  // scratch buffers hold the intermediate rows, which a backend that fuses need not write.
  // y = linear(w, rms_norm(x, weight)); xn [n_tokens][w.cols]: scratch for the normed rows.
  virtual void norm_linear(Buf x, Buf weight, float eps, Buf xn, const Matrix& w, int n_tokens, int n_decode, Buf y) {
    rms_norm(x, weight, xn, n_tokens, int(w.cols), eps);
    linear(w, xn, n_tokens, n_decode, y);
  }
  // x += linear(w, in) (the residual add); tmp [n_tokens][w.rows]: scratch for the product.
  virtual void linear_add(const Matrix& w, Buf in, int n_tokens, int n_decode, Buf tmp, Buf x) {
    linear(w, in, n_tokens, n_decode, tmp);
    add(x, tmp, n_tokens * int(w.rows));
  }
  // x += linear(w, silu_mul(gate_up)); act [n_tokens][w.cols] and tmp [n_tokens][w.rows]: scratch.
  virtual void silu_linear_add(const Matrix& w, Buf gate_up, int n_tokens, int n_decode, Buf act, Buf tmp, Buf x) {
    silu_mul(gate_up, act, n_tokens, int(w.cols));
    linear(w, act, n_tokens, n_decode, tmp);
    add(x, tmp, n_tokens * int(w.rows));
  }
  // out: int32 index of the largest of n floats (the first one on ties).
  virtual void argmax(Buf x, int n, Buf out) = 0;
  // Greedy decoding's step in a pass of one generated token of one sequence, after argmax wrote the
  // pass's token into tokens[0]: out[n_past] = tokens[0] (out: int32 by the position it follows),
  // then the pass moves on to that token (UpgPass::n_past, its UpgToken's pos and its UpgSeq's
  // n_past + 1), so the next pass runs on the device's own state with nothing uploaded.
  virtual void next_token(Buf pass, Buf tokens, Buf out) = 0;

  // ---- the sampler's cut (sampler.h), outside a pass, as upload and download ----
  // The k best drawable floats (not NaN, not -inf) of the n at `logits` by the sampler's order
  // (logit descending, then id ascending), the ids in skip left out, into top[k] (id -1 past the
  // last), and the skipped ids' floats into skipped[n_skip]. skip: ascending distinct ids in
  // [0, n) (the tokens the penalties and bias change: the host adjusts those few itself, so their
  // arithmetic has one definition). 1 <= k <= kMaxTopK. By default the row is downloaded and cut
  // on the host; a GPU cuts it where it is and moves only the k candidates.
  static constexpr int kMaxTopK = 256;
  virtual void top_k(Buf logits, int n, int k, const int32_t* skip, int n_skip, Candidate* top, float* skipped) {
    check_top_k(n, k, skip, n_skip);
    std::vector<float> row(static_cast<size_t>(n));
    download(row.data(), logits, row.size() * sizeof(float));
    top_k_host(row.data(), n, k, skip, n_skip, top, skipped);
  }

 protected:
  // Throws std::invalid_argument unless top_k's arguments are as it states.
  static void check_top_k(int n, int k, const int32_t* skip, int n_skip) {
    if (n < 1) throw std::invalid_argument("top_k: the row is empty");
    if (k < 1 || k > kMaxTopK)
      throw std::invalid_argument("top_k: k must be in [1, " + std::to_string(kMaxTopK) + "], got " + std::to_string(k));
    if (n_skip < 0) throw std::invalid_argument("top_k: negative skip count");
    for (int i = 0; i < n_skip; ++i)
      if (skip[i] < 0 || skip[i] >= n || (i > 0 && skip[i] <= skip[i - 1]))
        throw std::invalid_argument("top_k: skip ids must be ascending, distinct and inside the row");
  }
};

}  // namespace upg
