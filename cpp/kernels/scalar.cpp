// The reference kernels: plain C++ that follows docs/FORMAT.md literally. Every SIMD path is
// tested against the same numpy reference as this one; it is also the only path off x86.
#include <cmath>

#include "upg/kernels.h"

namespace upg {
namespace {

constexpr int kMaxSpan = 64;  // elements decoded at a time: one block, or a dense chunk

// Element j of quantized block g as the integer its scale multiplies.
int code(const WeightView& w, int64_t g, int j) {
  const int B = w.block;
  if (w.type == DType::Q8_0) return int8_t(w.codes[g * B + j]);
  if (w.type == DType::Q3) return q3_code(w.codes + g * (B / 4), w.high + g * (B / 8), B, j) - UPG_Q3_ZERO;
  if (w.type == DType::IQ3) return kIq3Grid[iq3_code(w.codes, w.high, g, j)];
  const uint8_t byte = w.codes[g * (B / 2) + j % (B / 2)];
  const int q = j < B / 2 ? byte & 15 : byte >> 4;
  return w.type == DType::Q4 ? q - UPG_Q4_ZERO : kIq4Grid[q];
}

// The scale of quantized block g: its f16 scale, or the super-scale times (ls - 32).
float scale(const WeightView& w, int64_t g) {
  if (!has_super_block(w.type)) return f16_to_f32(w.scales[g]);
  const int64_t nb = w.cols / w.block, r = g / nb;
  const int ls = sub_scale_code(w.sub + r * (nb / 2 + nb / 4), nb, g % nb);
  return f16_to_f32(w.scales[g / (UPG_SUPER_BLOCK / w.block)]) * float(ls - UPG_SUB_SCALE_BIAS);
}

// The elements [k0, k0 + n) of row r, by the spec's formulas; for quantized types exactly one
// block (k0 a multiple of the block, n = block).
void decode(const WeightView& w, int64_t r, int64_t k0, int n, float* out) {
  const int64_t i0 = r * w.cols + k0;  // element index in row-major order
  const uint16_t* h = reinterpret_cast<const uint16_t*>(w.codes) + i0;
  const int B = w.block;
  const int64_t g = i0 / (B ? B : 1);  // quantized: global block index = r * nb + k0 / B
  const float d = B ? scale(w, g) : 0.0f;
  switch (w.type) {
    case DType::F32:
      for (int j = 0; j < n; ++j) out[j] = reinterpret_cast<const float*>(w.codes)[i0 + j];
      return;
    case DType::F16:
      for (int j = 0; j < n; ++j) out[j] = f16_to_f32(h[j]);
      return;
    case DType::BF16:
      for (int j = 0; j < n; ++j) out[j] = bf16_to_f32(h[j]);
      return;
    default:  // quantized
      for (int j = 0; j < B; ++j) out[j] = d * float(code(w, g, j));
      return;
  }
}

int span(const WeightView& w, int64_t k0) {
  return w.block ? w.block : int(w.cols - k0 < kMaxSpan ? w.cols - k0 : kMaxSpan);
}

float outlier_dot(const WeightView& w, int64_t r, const float* x) {
  if (!w.o_rowptr) return 0.0f;
  float s = 0.0f;
  for (int32_t i = w.o_rowptr[r]; i < w.o_rowptr[r + 1]; ++i) s += f16_to_f32(w.o_val[i]) * x[w.o_col[i]];
  return s;
}


// Quantized weights against 8-bit activations (kernels.h): per block, the integer dot product times
// the weight's and the activation's scales. t: the activation row.
float row_dot_q8(const WeightView& w, int64_t r, const float* x, const ActQ8& a, int64_t t) {
  const int B = w.block;
  const int64_t nb = w.cols / B;
  const int8_t* q = a.q + t * w.cols;
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int j = 0; j < B; ++j) s += code(w, r * nb + b, j) * q[b * B + j];
    acc += scale(w, r * nb + b) * a.d[t * nb + b] * float(s);
  }
  return acc + outlier_dot(w, r, x);
}

// One output: the sum over spans of (the sum within the span).
float row_dot(const WeightView& w, int64_t r, const float* x) {
  float v[kMaxSpan];
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < w.cols;) {
    const int n = span(w, k0);
    decode(w, r, k0, n, v);
    float part = 0.0f;
    for (int j = 0; j < n; ++j) part += v[j] * x[k0 + j];
    acc += part;
    k0 += n;
  }
  return acc + outlier_dot(w, r, x);
}

void matvec(const WeightView& w, const float* x, const ActQ8& xq, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) y[r] = is_quantized(w.type) ? row_dot_q8(w, r, x, xq, 0) : row_dot(w, r, x);
}

// The reference has no tiling: the blocked-decode contract is about speed, not results.
void matmul(const WeightView& w, const float* x, const ActQ8& xq, int64_t n, float* y, int64_t ldy,
            int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = r0; r < r1; ++r)
      y[t * ldy + r] = is_quantized(w.type) ? row_dot_q8(w, r, x + t * w.cols, xq, t) : row_dot(w, r, x + t * w.cols);
}

void quantize_act(const float* x, int64_t n, int block, int8_t* q, float* d, int32_t* sum) {
  for (int64_t b = 0; b < n / block; ++b) {
    const float* xb = x + b * block;
    float amax = 0.0f;
    for (int j = 0; j < block; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    d[b] = f16_to_f32(f32_to_f16(amax / 127.0f));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int32_t s = 0;
    for (int j = 0; j < block; ++j) {
      const int v = int(std::nearbyint(xb[j] * id));  // half to even, as the SIMD conversions
      q[b * block + j] = int8_t(v);
      s += v;
    }
    sum[b] = s;
  }
}

void dequant_row(const WeightView& w, int64_t r, float* out) {
  for (int64_t k0 = 0; k0 < w.cols; k0 += span(w, k0)) decode(w, r, k0, span(w, k0), out + k0);
  if (!w.o_rowptr) return;
  for (int32_t i = w.o_rowptr[r]; i < w.o_rowptr[r + 1]; ++i) out[w.o_col[i]] += f16_to_f32(w.o_val[i]);
}

void axpy_rows_f32(const float* a, const float* x, int64_t rows, float* y, int64_t n) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0; i < n; ++i) y[i] += a[j] * x[j * n + i];
}

void axpy_rows_f16(const float* a, const uint16_t* x, int64_t rows, float* y, int64_t n) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0; i < n; ++i) y[i] += a[j] * f16_to_f32(x[j * n + i]);
}

void to_f16(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = f32_to_f16(x[i]);
}

float exp_shift_sum(float* x, int64_t n, float shift) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - shift));
  return s;
}

void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

// The reference has one way to sum a row: matmul computes each token as matvec does.
extern const Kernels kScalarKernels = {"scalar", matvec,   matmul,   matmul,   quantize_act,  dequant_row,
                                       axpy_rows_f32, axpy_rows_f16, to_f16,
                                       exp_shift_sum, silu_mul};

}  // namespace upg
