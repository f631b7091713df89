// Quantizers: the writer's side of docs/FORMAT.md.
//
// Choices the spec leaves open, mirrored by tests/reference/quant.py:
// - rounding is to nearest with ties to even (nearbyint in the default rounding mode, numpy's rint);
// - codes are computed against the scale as stored (f16-rounded), q = round(x / f16(d)), so each
//   decoded value is the grid point nearest to x; a scale that rounds to 0 gives zero codes;
// - q4 / q3: m is the first element of largest magnitude in the block.
// - with per-column importance, the scale is searched (weighted_scale below); without, the scale is
//   the one above, bit for bit.
// Dense types (block 0) are written too, so the writer has one entry point for every type.
#include <algorithm>
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

// A type's grid: element = d * (code - zero), codes in [lo, hi]; the plain scale is m / div, m
// the block's signed largest element (q4, q3; it lands on code 0) or its largest magnitude (q8_0).
struct Grid {
  float zero, lo, hi, div;
  bool signed_m;
};

Grid grid(DType type) {
  if (type == DType::Q8_0) return {0.0f, -127.0f, 127.0f, 127.0f, false};
  const float z = float(zero_point(type));
  return {z, 0.0f, 2.0f * z - 1.0f, -z, true};
}

// nearbyint for the search's code arithmetic without a libm call per element (baseline x86-64 has
// no rounding instruction): exact for |v| < 2^22, and beyond that the codes clamp either way.
float round_even(float v) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (v + kMagic) - kMagic;
}

// Codes minus zero point of x[0..n) under scale d != 0, as block_codes gives them (a loop the
// compiler vectorizes; the sums below run in four interleaved parts, n being a multiple of 32).
void codes_of(const float* x, int n, float d, const Grid& g, float* l) {
  for (int j = 0; j < n; ++j) l[j] = clampf(round_even(x[j] / d) + g.zero, g.lo, g.hi) - g.zero;
}

// Weighted squared error of a block stored with scale d (codes nearest to x under d), in double.
double block_error(const float* x, const double* wt, int n, float d, const Grid& g) {
  float l[64];
  if (d == 0.0f) std::fill(l, l + n, 0.0f);
  else codes_of(x, n, d, g, l);
  double err[4] = {0, 0, 0, 0};
  for (int j = 0; j < n; j += 4)
    for (int k = 0; k < 4; ++k) {
      const double e = double(x[j + k]) - double(d) * l[j + k];
      err[k] += wt[j + k] * e * e;
    }
  return (err[0] + err[1]) + (err[2] + err[3]);
}

// The stored (f16-exact) scale of one block under per-column importance, after llama.cpp's
// make_qx_quants: element weights importance * sqrt(mean square + x^2); candidates are the plain
// scale and, for each of 19 nudged divisors div + 0.1 * is (is in -9..9; negated for q4 / q3), the
// weighted least-squares scale of the codes that divisor gives. The candidate of least weighted
// error wins (the first on ties, so the plain scale unless another is strictly better).
// tests/reference/quant.py mirrors every rounding step.
float weighted_scale(const float* x, const float* importance, int n, const Grid& g) {
  const float m = g.signed_m ? signed_max(x, n) : [&] {
    float a = 0.0f;
    for (int j = 0; j < n; ++j) a = std::fmax(a, std::fabs(x[j]));
    return a;
  }();
  const auto f16_exact = [](float d) { return f16_to_f32(f32_to_f16(d)); };
  const float plain = f16_exact(m / g.div);
  if (m == 0.0f) return plain;
  double sigma2 = 0.0, wt[64];
  for (int j = 0; j < n; ++j) sigma2 += double(x[j]) * x[j];
  sigma2 /= n;
  for (int j = 0; j < n; ++j) wt[j] = double(importance[j]) * std::sqrt(sigma2 + double(x[j]) * x[j]);
  float best = plain;
  double best_err = block_error(x, wt, n, plain, g);
  float seen[20];  // scales evaluated: a repeat has the same error, so cannot win
  int n_seen = 0;
  seen[n_seen++] = plain;
  for (int is = -9; is <= 9; ++is) {
    const double div = double(g.div) + (g.div < 0 ? -0.1 : 0.1) * is;
    const float d = float(double(m) / div);
    if (d == 0.0f) continue;  // m is subnormal
    float l[64];
    codes_of(x, n, d, g, l);
    double lx[4] = {0, 0, 0, 0}, l2[4] = {0, 0, 0, 0};
    for (int j = 0; j < n; j += 4)
      for (int k = 0; k < 4; ++k) {
        lx[k] += wt[j + k] * l[j + k] * x[j + k];
        l2[k] += wt[j + k] * l[j + k] * l[j + k];
      }
    const double sumlx = (lx[0] + lx[1]) + (lx[2] + lx[3]), suml2 = (l2[0] + l2[1]) + (l2[2] + l2[3]);
    if (suml2 <= 0.0) continue;
    const float cand = f16_exact(float(sumlx / suml2));
    if (std::find(seen, seen + n_seen, cand) != seen + n_seen) continue;
    seen[n_seen++] = cand;
    const double err = block_error(x, wt, n, cand, g);
    if (err < best_err) best_err = err, best = cand;
  }
  return best;
}

// One block: codes at `codes` (and `high` for q3), its scale at `scale_out`; importance (the
// block's columns) nullptr for the plain scale.
void quantize_block(DType type, int B, const float* x, const float* importance, uint8_t* codes, uint8_t* high,
                    uint8_t* scale_out) {
  int q[64];
  const Grid g = grid(type);
  float d;
  if (importance) d = store_scale(weighted_scale(x, importance, B, g), scale_out);
  else if (type == DType::Q8_0) {
    float amax = 0.0f;
    for (int j = 0; j < B; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    d = store_scale(amax / 127.0f, scale_out);
  } else {
    d = store_scale(signed_max(x, B) / g.div, scale_out);
  }
  block_codes(x, B, d, g.zero, g.lo, g.hi, q);
  if (type == DType::Q8_0) {
    for (int j = 0; j < B; ++j) codes[j] = uint8_t(int8_t(q[j]));
  } else if (type == DType::Q4) {
    for (int i = 0; i < B / 2; ++i) codes[i] = uint8_t(q[i] | (q[i + B / 2] << 4));
  } else {
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
                   int64_t r0, int64_t r1, const float* importance) {
  if (!is_quantized(type)) return convert_rows(type, src, cols, out, r0, r1);
  const QuantSections s = quant_sections(type, rows, cols, block);
  const int B = block;
  const int64_t nb = cols / B;
  const int64_t code_bytes = type == DType::Q8_0 ? B : (type == DType::Q4 ? B / 2 : B / 4);
  const int64_t high_bytes = B / 8;  // q3 only
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = r * nb + b;
      quantize_block(type, B, src + r * cols + b * B, importance ? importance + b * B : nullptr, out + g * code_bytes,
                     out + s.high_offset() + g * high_bytes, out + s.scales_offset() + g * 2);
    }
}

}  // namespace upg
