// CPU kernel interface. One implementation per instruction set (scalar reference, AVX2, AVX-512),
// chosen at run time; the model graph calls only what is declared here.
#pragma once
#include <algorithm>
#include <cstdint>
#include "upg/quant.h"

namespace upg {

// A read-only weight matrix [rows, cols] of any UPG type, pointing into the mapped file.
struct WeightView {
  DType type = DType::F32;
  int block = 0;                    // elements per scale block (quantized types), else 0
  int64_t rows = 0, cols = 0;
  const uint8_t* codes = nullptr;   // dense data, or the qs / ql section
  const uint8_t* high = nullptr;    // q3, iq3: the qh section
  const uint8_t* sub = nullptr;     // iq4_xs, iq3: the sub-block scales
  const uint16_t* scales = nullptr; // quantized: f16 [rows][cols / block] (super-block types: / 256)
  // Sparse exact outliers (CSR), all null when absent:
  // W[r][o_col[i]] += f16(o_val[i]) for i in [o_rowptr[r], o_rowptr[r + 1]).
  const int32_t* o_rowptr = nullptr;
  const int32_t* o_col = nullptr;
  const uint16_t* o_val = nullptr;
};

// Quantized weights (q8_0, q4, q3) multiply activations quantized to 8 bits, as llama.cpp's
// Q8_0 / Q4_0 dot products do: integer dot products per block, then one float scale per block. Per
// block of the weight's block size B: d = f16(amax / 127), codes = round-half-even(x * 127 / amax)
// (0 when amax is 0). The sparse outliers and the dense types multiply x itself.

// n rows of activations quantized in blocks of `block` (rows of `cols` elements).
struct ActQ8 {
  int block = 0;
  const int8_t* q = nullptr;     // codes [n][cols]
  const float* d = nullptr;      // scales [n][cols / block], values of f16
  const int32_t* sum = nullptr;  // sum of each block's codes [n][cols / block]
};

struct Kernels {
  const char* name;  // "scalar", "avx2", "avx512"

  // Decode: y[r] = sum_k W[r][k] * x[k] for r in [r0, r1). Outliers are added in the same pass.
  // y points at element 0 of the full output (only [r0, r1) is written). xq: x quantized in
  // blocks of w.block, required when is_quantized(w.type), else unused.
  void (*matvec)(const WeightView& w, const float* x, const ActQ8& xq, float* y, int64_t r0, int64_t r1);

  // Decode of n generated tokens: y[t * ldy + r] = sum_k W[r][k] * x[t * cols + k], each token's
  // row with the bits matvec gives it alone (xq: n rows); each group of rows is read once for all.
  void (*matvec_n)(const WeightView& w, const float* x, const ActQ8& xq, int64_t n, float* y, int64_t ldy,
                   int64_t r0, int64_t r1);

  // Prefill: y[t * ldy + r] = sum_k W[r][k] * x[t * cols + k] for t in [0, n), r in [r0, r1).
  // Blocked: each weight tile is decoded once per block of tokens, never once per token.
  void (*matmul)(const WeightView& w, const float* x, const ActQ8& xq, int64_t n, float* y,
                 int64_t ldy, int64_t r0, int64_t r1);

  // One row of n elements (a multiple of block) quantized as ActQ8 describes: q[n], d and
  // sum[n / block]. Every path gives the same bits.
  void (*quantize_act)(const float* x, int64_t n, int block, int8_t* q, float* d, int32_t* sum);

  // out[k] = W[r][k] for k in [0, cols), outliers included (embedding lookup).
  void (*dequant_row)(const WeightView& w, int64_t r, float* out);

  // Decode attention's P V over one head's V rows (f32 or f16): y[k] += sum of a[j] * x[j * n + k]
  // over j in [0, rows) for k in [0, n), j in order (one FMA after another per element). The
  // scores, Q K^T, are a matvec over the K rows.
  void (*axpy_rows_f32)(const float* a, const float* x, int64_t rows, float* y, int64_t n);
  void (*axpy_rows_f16)(const float* a, const uint16_t* x, int64_t rows, float* y, int64_t n);
  void (*to_f16)(const float* x, uint16_t* y, int64_t n);            // round to nearest even

  // Softmax and SiLU: x[i] = e^(x[i] - shift), returning the sum; out[i] = silu(g[i]) * u[i] with
  // silu(v) = v / (1 + e^-v). The SIMD paths use a polynomial e^x within 2 ulp (simd_kernels.h).
  float (*exp_shift_sum)(float* x, int64_t n, float shift);
  void (*silu_mul)(const float* g, const float* u, float* out, int64_t n);
};

// Points w's section pointers into its data (w.codes, as set to the tensor's first byte), from its
// type and shape.
inline void set_sections(WeightView& w) {
  if (!is_quantized(w.type)) return;
  const QuantSections s = quant_sections(w.type, uint64_t(w.rows), uint64_t(w.cols), uint64_t(w.block));
  if (s.high) w.high = w.codes + s.high_offset();
  if (s.sub) w.sub = w.codes + s.sub_offset();
  w.scales = reinterpret_cast<const uint16_t*>(w.codes + s.scales_offset());
}

// Rows per work item when threads share one product of w with n tokens (ThreadPool::parallel_for).
// A multiple of 16, the row tile of every path, so that a row's sums never depend on the split.
// Decode takes a quarter of each thread's share of the matrix per item, kept within
// [kMinDecodeChunkBytes, kMaxDecodeChunkBytes]: each item restarts the hardware prefetch streams
// cold, and on the Phi-4 shape 64 KiB items decoded about 10% slower than 1-4 MiB ones (q4, two
// threads, alternating runs: docs/BENCHMARKS.md), while four items per thread still let a thread
// the OS deschedules leave little behind. Prefill takes about a quarter of each thread's share, in
// multiples of 96 rows (whole dense tiles of 48 and quantized pairs of 16-row tiles on AVX-512).
constexpr int64_t kMinDecodeChunkBytes = 64 << 10, kMaxDecodeChunkBytes = 4 << 20;
inline int64_t matmul_chunk_rows(const WeightView& w, int64_t n, int threads) {
  const auto round_up = [](int64_t v, int64_t m) { return (v + m - 1) / m * m; };
  if (n > 1) return round_up((w.rows + 4 * threads - 1) / (4 * int64_t(threads)), 96);
  int64_t row_bytes = w.cols * dense_elem_size(w.type);
  if (is_quantized(w.type)) {
    const QuantSections one_row = quant_sections(w.type, 1, uint64_t(w.cols), uint64_t(w.block));
    row_bytes = int64_t(one_row.codes + one_row.high + one_row.sub + one_row.scales);
  }
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t bytes = std::clamp(w.rows * row_bytes / (4 * int64_t(threads)), kMinDecodeChunkBytes, kMaxDecodeChunkBytes);
  return round_up(std::max<int64_t>(1, bytes / row_bytes), 16);
}

// The kernels used by the engine: named by the UPG_SIMD environment variable (scalar, avx2,
// avx512) when set, else the best this CPU runs. Throws std::runtime_error when UPG_SIMD names a
// path this CPU or build cannot run.
const Kernels& kernels();

// A path by name, or nullptr if it is not built in or this CPU cannot run it.
const Kernels* kernels_by_name(const char* name);

// Quantizers (the writer's side). Rows [r0, r1) of src ([rows, cols] f32, row-major) go into the
// sections of a quantized matrix laid out as docs/FORMAT.md says; `out` is its first byte and
// holds quant_sections(type, rows, cols, block).total() bytes. Dense types (block 0) are written
// row-major. Callers split rows across threads. importance: per-column weights [cols] (>= 0, e.g.
// the mean squared activation each column multiplies) for a scale search that minimizes the
// importance-weighted squared error; nullptr: the plain scale (docs/QUANTIZATION.md). Dense
// types ignore it. codes_src (same shape as src, nullptr: src): the codes are those of codes_src
// under the scales chosen for src (GPTQ, upg_backend/gptq.py: scales fixed when a block starts,
// each column rounded after the error of the columns before it has moved it). scales_src ([rows]
// [cols / block], nullptr: searched): the scales to store instead of searching them, f16 values; for
// iq4_xs / iq3 with super_src ([rows][cols / 256], f16 values), each block scale being its super-
// scale times an integer in [-32, 31] (the caller checks: GPTQ's refit, which fits them to H).
void quantize_rows(DType type, int block, const float* src, int64_t rows, int64_t cols,
                   uint8_t* out, int64_t r0, int64_t r1, const float* importance = nullptr,
                   const float* codes_src = nullptr, const float* scales_src = nullptr,
                   const float* super_src = nullptr);

// The scale each block of a quantized [rows, cols] matrix's bytes applies to its grid, float32
// [rows][cols / block]: the f16 block scale, or for iq4_xs / iq3 the super-scale times ls - 32.
void block_scales(DType type, int block, const uint8_t* data, int64_t rows, int64_t cols, float* out);

// The f16 super-scales of an iq4_xs / iq3 [rows, cols] matrix's bytes, float32 [rows][cols / 256].
void super_scales(DType type, const uint8_t* data, int64_t rows, int64_t cols, float* out);

// x[i] rounded as a quantized type rounds it under the scale scale[i] (the quantizers' own code
// choice): scale times the code's grid value (minus the zero point for q8_0 / q4 / q3).
void round_to_type(DType type, const float* x, const float* scale, int64_t n, float* out);

}  // namespace upg
