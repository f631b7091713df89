// The CUDA backend's kernel layer: one host launcher per op of the graph (docs/CUDA.md). Every
// pointer is a device pointer; every launch goes to the given stream and allocates nothing, so a
// sequence of them can be captured once as a CUDA graph and replayed.
//
// Per-pass values live in a small device buffer `pass` (upg_common.h: the UpgPass header, one
// UpgToken per token, one UpgSeq per sequence; a pass may hold tokens of several sequences): kernels
// that depend on positions, slots or the token count read them there, not from launch arguments. The
// token count in an argument struct (UpgMatArgs::n_tokens, UpgRopeArgs::n_tokens,
// UpgAttnArgs::n_tokens, UpgEltArgs::n_tokens) is the capacity the launch is sized for (the
// largest batch); pass[kPassNTokens] must not exceed it.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "upg/upg_common.h"  // the type codes and argument structs every backend shares

namespace upg::cuda {

// Slots of the per-pass buffer's header (UpgPass).
enum PassSlot : int {
  kPassNPast = 0,    // sequence 0's n_past (greedy decoding's next_token appends there)
  kPassNTokens = 1,  // tokens of this pass
  kPassCount = 4,    // int32 slots of the header (n_seqs, n_decode)
};

// Once per device, before any launch or capture: reads the multiprocessor count and raises the
// dynamic shared-memory limits of the kernels that need more than 48 KiB.
void init(int device);

// Programmatic dependent launch (each kernel may start while the previous one drains; it waits
// for that grid before reading its inputs): on by default on sm_90 and newer. For measurements.
void set_programmatic_launch(bool on);

// GB/s of one pass of 16-byte loads over `bytes` of device memory (median of 10 timed passes): the
// decode floor the benchmarks compare against. Synchronizes; not for capture.
double read_bandwidth(size_t bytes);

// A weight matrix of any UPG type: `data` is its first byte on the device (sections as in
// docs/FORMAT.md, offsets in `args`), outliers nullptr when absent. dtype: UPG_DTYPE_*.
struct Weight {
  int dtype = UPG_DTYPE_F32;
  UpgMatArgs args{};          // rows, cols, block, high_offset, scales_offset, n_tokens, ldy
  const void* data = nullptr;
  const int32_t* rowptr = nullptr;
  const int32_t* col = nullptr;
  const uint16_t* val = nullptr;  // f16 bits
};
// Fills args from the type and shape (n_tokens = capacity, ldy = rows).
Weight make_weight(int dtype, int rows, int cols, int block, const void* data, int n_tokens = 1,
                   const int32_t* rowptr = nullptr, const int32_t* col = nullptr,
                   const uint16_t* val = nullptr);

// Optional fusions of the mat-vec: its input prologue and output epilogue (all off by default).
struct MatvecFuse {
  const float* norm_weight = nullptr;  // x := rms_norm(x) * norm_weight before the product
  float eps = 0.0f;
  bool silu_mul = false;  // x holds gate_up [2 * cols]: x := silu(gate) * up
  bool accumulate = false;  // y += W x instead of y = W x (residual add)
};

// y[rows] = W x[cols] (+ outliers), one token. Streams W once with 16-byte loads.
void matvec(const Weight& w, const float* x, float* y, cudaStream_t s, const MatvecFuse& fuse = {});
// y[t * ldy + r] = sum_k W[r][k] x[t * cols + k] (+ outliers) for t < n (no fusions): the mat-vec of
// several tokens, reading W once per matvec_tokens(w) of them, each token's y with the bits matvec
// gives it alone. x 16-byte aligned for quantized W.
void matvec_n(const Weight& w, const float* x, float* y, int n, cudaStream_t s);
int matvec_tokens(const Weight& w);  // tokens one launch takes (up to 16; fewer when x is large)
// y[t * ldy + r] = sum_k W[r][k] x[t * cols + k] (+ outliers) for t < min(pass[kPassNTokens],
// w.args.n_tokens) (a run of the pass's rows: its prompt rows, or rows whose logits are asked), on the
// tensor cores: quantized W as int8 codes times x rounded to 8 bits per block as the mat-vec and
// the CPU round it (s32 sums per block, scaled into f32); dense W and x rounded to f16 (f32 sums).
// Quantized W needs `scratch`: matmul_scratch(w) bytes of device memory, 16-byte aligned, for the
// rounded x (capacity rows), which no other launch may use until this one is done.
void matmul(const Weight& w, const float* x, float* y, const int32_t* pass, cudaStream_t s, void* scratch = nullptr);
size_t matmul_scratch(const Weight& w);  // 0 for dense weights
// out[t][k] = W[ids[t]][k] (+ outliers) for t < pass[kPassNTokens]; an id outside [0, rows)
// gives a zero row.
void get_rows(const Weight& w, const int32_t* ids, float* out, const int32_t* pass, cudaStream_t s);

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight for t < pass[kPassNTokens] (rows of a.n);
// last_only: only the pass's last token, written to out row 0.
void rms_norm(const float* x, const float* weight, float* out, const UpgNormArgs& a, int capacity,
              bool last_only, const int32_t* pass, cudaStream_t s);
// In place over the first a.n_heads heads of each token row (queries then keys of the fused qkv),
// at each token's position (its UpgToken); inv_freq [rot_dims / 2]: the model's (the LongRoPE set the
// host picked for a pass of one sequence), then the long set for the tokens of rope_set 1.
void rope(float* qkv, const float* inv_freq, const UpgRopeArgs& a, const int32_t* pass, cudaStream_t s);
// Stores the K and V heads of the pass's tokens (qkv rows) at positions kv_base + pos (each token's
// UpgToken: its slot and position) of a layer's cache [n_kv_heads][kv_stride][head_dim], f16 or f32.
void kv_store(const float* qkv, void* k_cache, void* v_cache, bool f16, const UpgAttnArgs& a,
              const int32_t* pass, cudaStream_t s);

// Decode attention of the pass's generated tokens [0, a.n_decode), each attending positions
// [0, pos] of its slot (its UpgToken; after kv_store), as flash-decoding: the positions are cut into
// splits of a fixed length, one block per (KV head, split, token) handles all query heads of its
// group, then a combine launch merges the splits. The splits' layout depends on a.slot_len only.
struct DecodeSplits {
  int split_len;     // positions per split
  int max_splits;    // ceil(slot_len / split_len): the grid, per token
  size_t workspace;  // bytes of f32 scratch that attention_decode needs (n_decode tokens)
};
DecodeSplits decode_splits(const UpgAttnArgs& a);
void attention_decode(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                      const UpgAttnArgs& a, float* workspace, const int32_t* pass, cudaStream_t s);
// Prefill attention of the pass's prompt tokens [a.n_decode, n_tokens): token i of a prompt
// sequence (its UpgSeq) attends causally positions [0, n_past + i] of its slot; query tiles per
// sequence (never two sequences in a tile), tiles of keys in shared memory, online softmax (flash
// attention). The grid is sized by a.n_tokens, a.n_decode and a.n_seqs.
void attention_prefill(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                       const UpgAttnArgs& a, const int32_t* pass, cudaStream_t s);

// out[t][i] = silu(in[t][i]) * in[t][a.n + i], rows of in a.in_stride floats apart.
void silu_mul(const float* gate_up, float* out, const UpgEltArgs& a, const int32_t* pass, cudaStream_t s);
// x[i] += y[i] for i < a.n * pass[kPassNTokens].
void add(float* x, const float* y, const UpgEltArgs& a, const int32_t* pass, cudaStream_t s);
// out[0] = index of the largest of x[0..n) (the lowest on ties).
void argmax(const float* x, int n, int32_t* out, cudaStream_t s);
// Greedy decoding's step (a pass of one token of one sequence, laid out as upg_common.h's UpgPass,
// UpgToken, UpgSeq): out[n_past] = token[0], then the pass moves to the next position, so a
// captured decode step replays with nothing uploaded.
void next_token(int32_t* pass, const int32_t* token, int32_t* out, cudaStream_t s);

// The sampler's cut (Backend::top_k), launched outside the passes: the k best floats of x[0..n)
// by value descending, then index ascending, NaN, -inf and the skip indices (ascending, n_skip)
// left out, into ids[k] (-1 past the last) and logits[k]; skipped[i] = x[skip[i]]. 1 <= k <=
// kTopKMax; scratch: top_k_scratch(n, k) bytes.
constexpr int kTopKMax = 256;
size_t top_k_scratch(int n, int k);
void top_k(const float* x, int n, int k, const int32_t* skip, int n_skip, int32_t* ids, float* logits, float* skipped,
           void* scratch, cudaStream_t s);

// Device memory that grows to the largest need asked of it and frees itself.
class DeviceScratch {
 public:
  DeviceScratch() = default;
  DeviceScratch(const DeviceScratch&) = delete;
  DeviceScratch& operator=(const DeviceScratch&) = delete;
  ~DeviceScratch();
  void* need(size_t bytes);  // growing waits for the queued work (cudaFree synchronizes)
  void* get() const { return p_; }
  void* const* address() const { return &p_; }  // for launches recorded before it grows
  size_t bytes() const { return bytes_; }

 private:
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace upg::cuda
