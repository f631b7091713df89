// Quantizers: the writer's side of docs/FORMAT.md.
//
// Choices the spec leaves open, mirrored by tests/reference/quant.py:
// - rounding is to nearest with ties to even (nearbyint in the default rounding mode, numpy's rint);
// - codes are computed against the scale as stored (f16-rounded), q = round(x / f16(d)), so each
//   decoded value is the grid point nearest to x; a scale that rounds to 0 gives zero codes;
// - q4 / q3: m is the first element of largest magnitude in the block.
// Dense types (block 0) are written too, so the writer has one entry point for every type.
#include <cmath>
#include <cstring>

#include "upg/kernels.h"

namespace upg {
namespace {

float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Stores f16(d) at *scale_out and returns it as f32.
float store_scale(float d, uint8_t* scale_out) {
  const uint16_t h = f32_to_f16(d);
  std::memcpy(scale_out, &h, 2);
  return f16_to_f32(h);
}

// The element of largest magnitude, its sign kept (the first one on ties).
float signed_max(const float* x, int n) {
  float m = 0.0f;
  for (int j = 0; j < n; ++j)
    if (std::fabs(x[j]) > std::fabs(m)) m = x[j];
  return m;
}

// Codes of one block: round(x / d) + zero point, clamped to [lo, hi]; all zero points when d == 0.
void block_codes(const float* x, int n, float d, float zero, float lo, float hi, int* q) {
  for (int j = 0; j < n; ++j)
    q[j] = d == 0.0f ? int(zero) : int(clampf(std::nearbyint(x[j] / d) + zero, lo, hi));
}

// One block: codes at `codes` (and `high` for q3), its scale at `scale_out`.
void quantize_block(DType type, int B, const float* x, uint8_t* codes, uint8_t* high, uint8_t* scale_out) {
  int q[64];
  if (type == DType::Q8_0) {
    float amax = 0.0f;
    for (int j = 0; j < B; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    block_codes(x, B, store_scale(amax / 127.0f, scale_out), 0.0f, -127.0f, 127.0f, q);
    for (int j = 0; j < B; ++j) codes[j] = uint8_t(int8_t(q[j]));
  } else if (type == DType::Q4) {
    block_codes(x, B, store_scale(signed_max(x, B) / -float(UPG_Q4_ZERO), scale_out), UPG_Q4_ZERO, 0.0f, 15.0f, q);
    for (int i = 0; i < B / 2; ++i) codes[i] = uint8_t(q[i] | (q[i + B / 2] << 4));
  } else {
    block_codes(x, B, store_scale(signed_max(x, B) / -float(UPG_Q3_ZERO), scale_out), UPG_Q3_ZERO, 0.0f, 7.0f, q);
    for (int i = 0; i < B / 4; ++i) {
      int v = 0;
      for (int k = 0; k < 4; ++k) v |= (q[i + k * B / 4] & 3) << (2 * k);
      codes[i] = uint8_t(v);
    }
    for (int i = 0; i < B / 8; ++i) {
      int v = 0;
      for (int k = 0; k < 8; ++k) v |= ((q[i + k * B / 8] >> 2) & 1) << k;
      high[i] = uint8_t(v);
    }
  }
}

// Dense types (block 0): row-major elements, rounded to nearest even (as numpy's and torch's casts).
void convert_rows(DType type, const float* src, int64_t cols, uint8_t* out, int64_t r0, int64_t r1) {
  const int64_t i0 = r0 * cols, i1 = r1 * cols;
  if (type == DType::F32) {
    std::memcpy(out + i0 * 4, src + i0, size_t(i1 - i0) * 4);
    return;
  }
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = i0; i < i1; ++i) {
    if (type == DType::F16) {
      o[i] = f32_to_f16(src[i]);
      continue;
    }
    uint32_t bits;
    std::memcpy(&bits, &src[i], 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) o[i] = uint16_t((bits >> 16) | 0x40);  // quiet NaN
    else o[i] = uint16_t((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
  }
}

}  // namespace

void quantize_rows(DType type, int block, const float* src, int64_t rows, int64_t cols, uint8_t* out,
                   int64_t r0, int64_t r1) {
  if (!is_quantized(type)) return convert_rows(type, src, cols, out, r0, r1);
  const QuantSections s = quant_sections(type, rows, cols, block);
  const int B = block;
  const int64_t nb = cols / B;
  const int64_t code_bytes = type == DType::Q8_0 ? B : (type == DType::Q4 ? B / 2 : B / 4);
  const int64_t high_bytes = B / 8;  // q3 only
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = r * nb + b;
      quantize_block(type, B, src + r * cols + b * B, out + g * code_bytes,
                     out + s.high_offset() + g * high_bytes, out + s.scales_offset() + g * 2);
    }
}

}  // namespace upg
