// The CPU backend: buffers in host memory (the weights are the mapped file itself), the kernels of
// the run-time chosen SIMD path (upg/kernels.h), a thread pool. Quantized weights multiply 8-bit
// activations (docs/ARCHITECTURE.md "How the CPU kernels multiply").
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "upg/backend.h"
#include "upg/kernels.h"
#include "upg/threadpool.h"

namespace upg {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int n_threads);  // 0: all cores

  const char* name() const override { return "cpu"; }
  int max_seqs() const override { return 1 << 20; }
  Buf weights(const void* data, size_t bytes, uint64_t content) override;
  Buf alloc(size_t bytes) override;
  void upload(Buf dst, const void* src, size_t bytes) override;
  void download(void* dst, Buf src, size_t bytes) override;
  void begin(Buf pass) override;

  void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) override;
  void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) override;
  void linear(const Matrix& w, Buf x, int n_tokens, int n_decode, Buf y) override;
  void rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& args) override;
  void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) override;
  void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& args) override;
  void silu_mul(Buf gate_up, Buf out, int n_tokens, int n) override;
  void add(Buf x, Buf y, int n) override;
  void argmax(Buf x, int n, Buf out) override;
  void next_token(Buf pass, Buf tokens, Buf out) override;

  // Calibration (upg_backend/calibrate.py): while on, linear() adds the square of every input
  // element to its column's sum, per weight matrix (keyed by the byte offset of its data in the
  // weights buffer, the file's data-section offset), and counts the rows. O(sum of input widths)
  // memory: 1.3 M doubles for Phi-4.
  struct ColumnSquares {
    std::vector<double> sum;  // [cols]
    int64_t rows = 0;
  };
  void collect_column_squares(bool on) { collect_ = on; }
  const std::map<uint64_t, ColumnSquares>& column_squares() const { return squares_; }
  void clear_column_squares() { squares_.clear(); }
  // GPTQ's Gram matrices (upg_backend/calibrate.py): while a matrix's offset is in the set given,
  // linear() also keeps a copy of its float32 inputs [n_tokens][cols], appended call by call until
  // take_inputs() moves them out (Python sums x x^T per window, so memory is one window's inputs).
  struct Inputs {
    int64_t cols = 0;
    std::vector<float> x;  // [n_tokens][cols]
  };
  void capture_inputs(std::vector<uint64_t> offsets) { capture_ = {offsets.begin(), offsets.end()}; }
  std::map<uint64_t, Inputs> take_inputs() { return std::exchange(inputs_, {}); }

 private:
  template <typename T = uint8_t>
  T* ptr(Buf b) const { return reinterpret_cast<T*>(base_[size_t(b.id)] + b.offset); }
  WeightView view(const Matrix& w) const;
  ActQ8 quantize_act(const float* x, int64_t n, int64_t cols, int block);
  // Generated tokens run attention as one mat-vec over the keys and one axpy over the values per
  // head (decode); prompt tokens as matrix products over their sequence's keys (blocked), however
  // few they are, so that a token's result never depends on how its prompt was cut into passes.
  void attention_decode(const float* qkv, Buf k_cache, Buf v_cache, float* out, bool f16, const UpgAttnArgs& a);
  void attention_blocked(const float* qkv, const uint8_t* k, const uint8_t* v, float* out, int64_t n_past,
                         bool f16, const UpgAttnArgs& a);

  const UpgPass* pass_ = nullptr;  // of the pass begun
  const UpgSeq* seqs_ = nullptr;   // its sequences
  uint64_t pass_count_ = 0;        // passes begun (keys the RoPE tables)
  bool collect_ = false;
  std::map<uint64_t, ColumnSquares> squares_;
  std::set<uint64_t> capture_;
  std::map<uint64_t, Inputs> inputs_;
  const Kernels& k_;
  ThreadPool pool_;
  std::vector<uint8_t*> base_;                      // by buffer id
  std::vector<std::unique_ptr<uint8_t[]>> owned_;   // what alloc() made

  // Scratch, grown on demand.
  std::vector<float> cos_, sin_;     // [n_tokens][rot_dims / 2] of the last rope pass
  uint64_t rope_pass_ = 0;           // the pass they are of
  const float* rope_freq_ = nullptr;
  std::vector<float> scores_;        // [n_threads][positions] decode attention scores
  struct AttentionScratch {          // per thread, for attention_blocked
    std::vector<float> q, s, vt;     // query chunk, its scores, V^T of one kv head
  };
  std::vector<AttentionScratch> att_scratch_;
  // A matmul input quantized to 8 bits (quantized weights), grown to the largest input.
  std::vector<int8_t> xq_;           // [n][cols]
  std::vector<float> xq_d_;          // [n][cols / block]
  std::vector<int32_t> xq_sum_;      // [n][cols / block]
};

}  // namespace upg
