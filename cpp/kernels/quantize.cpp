// Quantizers: the writer's side of docs/FORMAT.md.
//
// Choices the spec leaves open, mirrored by tests/reference/quant.py:
// - rounding is to nearest with ties to even (nearbyint in the default rounding mode, numpy's rint);
// - codes are computed against the scale as stored (f16-rounded), q = round(x / f16(d)), so each
//   decoded value is the grid point nearest to x; a scale that rounds to 0 gives zero codes;
// - q4 / q3: m is the first element of largest magnitude in the block.
// - with per-column importance, the scale is searched (weighted_scale below); without, the scale is
//   the one above, bit for bit.
// - iq4_nl, iq4_xs, iq3 (grids): the importance-weighted search of grid_scale and quantize_super
//   below; codes are the nearest grid value to x / scale as stored (ties to the upper value). The
//   reference checks these properties rather than the bytes.
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

// The code of x under scale d: round(x / d) + zero point, clamped to [lo, hi]; the zero point when d == 0.
inline int uniform_code(float x, float d, float zero, float lo, float hi) {
  return d == 0.0f ? int(zero) : int(clampf(std::nearbyint(x / d) + zero, lo, hi));
}

// Codes of one block.
void block_codes(const float* x, int n, float d, float zero, float lo, float hi, int* q) {
  for (int j = 0; j < n; ++j) q[j] = uniform_code(x[j], d, zero, lo, hi);
}

// A uniform type's codes: element = d * (code - zero), codes in [lo, hi]; the plain scale is m / div, m
// the block's signed largest element (q4, q3; it lands on code 0) or its largest magnitude (q8_0).
struct UniformGrid {
  float zero, lo, hi, div;
  bool signed_m;
};

UniformGrid uniform_grid(DType type) {
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
void codes_of(const float* x, int n, float d, const UniformGrid& g, float* l) {
  for (int j = 0; j < n; ++j) l[j] = clampf(round_even(x[j] / d) + g.zero, g.lo, g.hi) - g.zero;
}

// Weighted squared error of a block stored with scale d (codes nearest to x under d), in double.
double block_error(const float* x, const double* wt, int n, float d, const UniformGrid& g) {
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
float weighted_scale(const float* x, const float* importance, int n, const UniformGrid& g) {
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

// One block: its scale (at `scale_out`) chosen for x, or the given one, the codes of xc under it at
// `codes` (and `high` for q3); importance (the block's columns) nullptr for the plain scale.
void quantize_block(DType type, int B, const float* x, const float* xc, const float* importance, const float* given,
                    uint8_t* codes, uint8_t* high, uint8_t* scale_out) {
  int q[64];
  const UniformGrid g = uniform_grid(type);
  float d;
  if (given) d = store_scale(*given, scale_out);
  else if (importance) d = store_scale(weighted_scale(x, importance, B, g), scale_out);
  else if (type == DType::Q8_0) {
    float amax = 0.0f;
    for (int j = 0; j < B; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    d = store_scale(amax / 127.0f, scale_out);
  } else {
    d = store_scale(signed_max(x, B) / g.div, scale_out);
  }
  block_codes(xc, B, d, g.zero, g.lo, g.hi, q);
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

// ---- grid types (iq4_nl, iq4_xs, iq3) ----

// The nearest grid value is looked up in cells of half a grid unit: every midpoint between two
// grid values (integers) is a multiple of 1/2, so the nearest value is the same across a cell,
// and a value on a midpoint falls in the cell above it (ties to the upper value). A binary search
// here cost the writer 500 ns a weight in mispredicted branches.
constexpr int kCells = 512;  // [-128, 128) in halves
struct Grid {
  const int8_t* g;
  int n;
  float step;  // trial spacing of the scale search, in grid units
  uint8_t cell[kCells];
  Grid(const int8_t* values, int count, float trial_step) : g(values), n(count), step(trial_step), cell() {
    for (int c = 0; c < kCells; ++c) {
      const float v = float(c - kCells / 2) / 2.0f + 0.25f;  // inside the cell: no midpoint there
      int best = 0;
      for (int i = 1; i < n; ++i)
        if (std::fabs(v - float(g[i])) < std::fabs(v - float(g[best]))) best = i;
      cell[c] = uint8_t(best);
    }
  }
};
const Grid& grid_of(DType t) {
  static const Grid iq4(kIq4Grid, 16, 1.0f), iq3(kIq3Grid, 8, 2.0f);
  return t == DType::IQ3 ? iq3 : iq4;
}
// Index of the grid value nearest v (ties to the upper value).
inline int nearest(const Grid& G, float v) {
  const float c = clampf(2.0f * v + float(kCells / 2), 0.0f, float(kCells - 1));
  return G.cell[int(c)];
}
constexpr int kTries = 7;  // trial scales on each side of each end of the grid

// Weights of the squared errors of n elements: importance (the mean squared activation of each
// input column) times sqrt(sigma2 + x^2), as llama.cpp's imatrix quantizers weigh them; all 1
// without importance (on the testbed that beat llama.cpp's x^2 and sqrt(sigma2 + x^2): mean KLD
// iq4_xs 0.0135 against 0.0143 and 0.0135, iq3 0.057 against 0.066 and 0.058). All equal when
// every weight is 0, so a block still gets a scale.
void error_weights(const float* x, const float* importance, int n, float* wt) {
  float sumx2 = 0.0f;
  for (int j = 0; j < n; ++j) sumx2 += x[j] * x[j];
  const float sigma2 = sumx2 / float(n);
  float total = 0.0f;
  for (int j = 0; j < n; ++j) total += wt[j] = importance ? importance[j] * std::sqrt(sigma2 + x[j] * x[j]) : 1.0f;
  if (!(total > 0.0f))
    for (int j = 0; j < n; ++j) wt[j] = 1.0f;
}

// Weighted squared error of x against scale d times the grid values nearest x / d.
float grid_error(const Grid& G, const float* x, const float* wt, int n, float d) {
  float e = 0.0f;
  for (int j = 0; j < n; ++j) {
    const float v = d == 0.0f ? 0.0f : d * float(G.g[nearest(G, x[j] / d)]);
    e += wt[j] * (x[j] - v) * (x[j] - v);
  }
  return e;
}

// The signed scale of one block of n elements: trial inverse scales put the element of largest
// magnitude near either end of the grid (so the block may take the grid or its mirror image); each
// trial's codes give the least-squares scale sum(w x q) / sum(w q^2), and the trial with the least
// weighted error, sum(w x^2) - sum(w x q)^2 / sum(w q^2), wins.
float grid_scale(const Grid& G, const float* x, const float* wt, int n) {
  float m = signed_max(x, n);
  if (m == 0.0f) return 0.0f;
  float best_num = 0.0f, best_den = 1.0f, best_d = 0.0f;
  for (const float end : {float(G.g[0]), float(G.g[G.n - 1])})
    for (int t = -kTries; t <= kTries; ++t) {
      const float id = (end + G.step * float(t)) / m;
      float sqx = 0.0f, sq2 = 0.0f;
      for (int j = 0; j < n; ++j) {
        const float q = float(G.g[nearest(G, id * x[j])]);
        sqx += wt[j] * x[j] * q;
        sq2 += wt[j] * q * q;
      }
      if (sq2 > 0.0f && sqx * sqx * best_den > best_num * sq2) {
        best_num = sqx * sqx;
        best_den = sq2;
        best_d = sqx / sq2;
      }
    }
  return best_d;
}

// The code (grid index) of x under the stored scale d.
inline int grid_code(const Grid& G, float x, float d) { return nearest(G, d == 0.0f ? 0.0f : x / d); }

// Codes of one block of 32 against the stored scale d.
void grid_codes(const Grid& G, const float* x, float d, int* q) {
  for (int j = 0; j < 32; ++j) q[j] = grid_code(G, x[j], d);
}

// q4's packing of one block of 32 codes.
void pack_nibbles(const int* q, uint8_t* codes) {
  for (int i = 0; i < 16; ++i) codes[i] = uint8_t(q[i] | (q[i + 16] << 4));
}

// iq3's packing of a group of 4 blocks (128 codes; FORMAT.md): 32 ql bytes, 16 qh bytes.
void pack_iq3_group(const int* q, uint8_t* ql, uint8_t* qh) {
  for (int i = 0; i < 32; ++i) {
    int v = 0;
    for (int p = 0; p < 4; ++p) v |= (q[32 * p + i] & 3) << (2 * p);
    ql[i] = uint8_t(v);
  }
  for (int i = 0; i < 16; ++i) {
    int v = 0;
    for (int k = 0; k < 8; ++k) v |= ((q[16 * k + i] >> 2) & 1) << k;
    qh[i] = uint8_t(v);
  }
}

// The scales of one super-block xs of iq4_xs or iq3: each sub-block's best scale (grid_scale); the
// f16 super-scale d maps the largest of them to ls - 32 = -32; each sub-block takes the 6-bit ls
// among the three nearest to its scale / d with the least weighted error; then d is refitted by
// least squares to the chosen ls and codes and kept if that lowers the error. Stores d at
// scale_out and returns it; each sub-block's ls - 32 goes to ls.
float choose_super_scales(const Grid& G, const float* xs, const float* importance, int* ls, uint8_t* scale_out) {
  constexpr int B = 32, S = UPG_SUPER_BLOCK, NS = S / B, BIAS = UPG_SUB_SCALE_BIAS;
  float wt[S], sc[NS];
  error_weights(xs, importance, S, wt);
  float smax = 0.0f;
  for (int i = 0; i < NS; ++i) {
    sc[i] = grid_scale(G, xs + i * B, wt + i * B, B);
    if (std::fabs(sc[i]) > std::fabs(smax)) smax = sc[i];
  }
  // (d, ls) candidates: the scale from smax, then its least-squares refit
  float d = store_scale(-smax / float(BIAS), scale_out);
  float err = 0.0f;
  const auto choose_ls = [&](float dd, int* l) {
    float e = 0.0f;
    for (int i = 0; i < NS; ++i) {
      if (dd == 0.0f) { l[i] = 0; e += grid_error(G, xs + i * B, wt + i * B, B, 0.0f); continue; }
      const int l0 = int(std::nearbyint(clampf(sc[i] / dd, -float(BIAS), float(BIAS - 1))));
      float best = INFINITY;
      for (int c = l0 - 1; c <= l0 + 1; ++c) {
        if (c < -BIAS || c > BIAS - 1) continue;
        const float ec = grid_error(G, xs + i * B, wt + i * B, B, dd * float(c));
        if (ec < best) { best = ec; l[i] = c; }
      }
      e += best;
    }
    return e;
  };
  err = choose_ls(d, ls);
  if (d != 0.0f) {
    float sxq = 0.0f, sq2 = 0.0f;
    for (int i = 0; i < NS; ++i) {
      const float dl = d * float(ls[i]);
      for (int j = 0; j < B; ++j) {
        const float q = dl == 0.0f ? 0.0f : float(ls[i]) * float(G.g[nearest(G, xs[i * B + j] / dl)]);
        sxq += wt[i * B + j] * xs[i * B + j] * q;
        sq2 += wt[i * B + j] * q * q;
      }
    }
    const float d2 = sq2 > 0.0f ? f16_to_f32(f32_to_f16(sxq / sq2)) : 0.0f;
    int ls2[NS] = {};
    if (d2 != 0.0f && std::isfinite(d2)) {
      const float err2 = choose_ls(d2, ls2);
      if (err2 < err) {
        d = store_scale(d2, scale_out);
        std::memcpy(ls, ls2, sizeof ls);
      }
    }
  }
  return d;
}

// One row of iq4_xs or iq3. The scales are chosen for x (choose_super_scales), or given (given_sc:
// the row's block scales, each given_d[s] * (ls - 32) of its super-block's f16 super-scale given_d[s]);
// the codes are those of xc.
void quantize_super_row(DType type, const float* x, const float* xc, const float* importance, const float* given_sc,
                        const float* given_d, int64_t cols, uint8_t* codes, uint8_t* high, uint8_t* sub,
                        uint8_t* scale_out) {
  constexpr int B = 32, S = UPG_SUPER_BLOCK, NS = S / B, BIAS = UPG_SUB_SCALE_BIAS;
  const Grid& G = grid_of(type);
  const int64_t nb = cols / B;
  std::memset(sub, 0, size_t(nb / 2 + nb / 4));
  for (int64_t s0 = 0; s0 < cols; s0 += S) {
    int ls[NS] = {};
    float d;
    if (given_d) {
      d = store_scale(given_d[s0 / S], scale_out);
      for (int i = 0; i < NS; ++i) ls[i] = d == 0.0f ? 0 : int(std::nearbyint(given_sc[s0 / B + i] / d));
    } else {
      d = choose_super_scales(G, x + s0, importance ? importance + s0 : nullptr, ls, scale_out);
    }
    scale_out += 2;
    int q[S];
    for (int i = 0; i < NS; ++i) grid_codes(G, xc + s0 + i * B, d * float(ls[i]), q + i * B);
    if (type == DType::IQ3)
      for (int k = 0; k < S / 128; ++k) pack_iq3_group(q + 128 * k, codes + s0 / 4 + 32 * k, high + s0 / 8 + 16 * k);
    for (int i = 0; i < NS; ++i) {
      const int64_t b = s0 / B + i;
      if (type != DType::IQ3) pack_nibbles(q + i * B, codes + b * (B / 2));
      const int code = ls[i] + BIAS;
      sub[b / 2] |= uint8_t((code & 15) << (4 * (b & 1)));
      sub[nb / 2 + b / 4] |= uint8_t((code >> 4) << (2 * (b & 3)));
    }
  }
}

// One block of iq4_nl: its own f16 scale from grid_scale for x (or the given one), the codes of xc.
void quantize_iq4_nl_block(const float* x, const float* xc, const float* importance, const float* given,
                           uint8_t* codes, uint8_t* scale_out) {
  constexpr int B = 32;
  const Grid& G = grid_of(DType::IQ4_NL);
  float wt[B];
  int q[B];
  if (given) {
    grid_codes(G, xc, store_scale(*given, scale_out), q);
  } else {
    error_weights(x, importance, B, wt);
    grid_codes(G, xc, store_scale(grid_scale(G, x, wt, B), scale_out), q);
  }
  pack_nibbles(q, codes);
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
                   int64_t r0, int64_t r1, const float* importance, const float* codes_src, const float* scales_src,
                   const float* super_src) {
  if (!is_quantized(type)) return convert_rows(type, src, cols, out, r0, r1);
  const float* xc = codes_src ? codes_src : src;
  const QuantSections s = quant_sections(type, rows, cols, block);
  const int64_t nb = cols / block;
  const auto given = [&](int64_t r, int64_t b) { return scales_src ? scales_src + r * nb + b : nullptr; };
  if (has_super_block(type)) {
    const int64_t code_bytes = type == DType::IQ3 ? cols / 4 : cols / 2;
    for (int64_t r = r0; r < r1; ++r)
      quantize_super_row(type, src + r * cols, xc + r * cols, importance, given(r, 0),
                         super_src ? super_src + r * (cols / UPG_SUPER_BLOCK) : nullptr, cols, out + r * code_bytes,
                         out + s.high_offset() + r * (cols / 8), out + s.sub_offset() + r * (nb / 2 + nb / 4),
                         out + s.scales_offset() + r * (cols / UPG_SUPER_BLOCK) * 2);
    return;
  }
  if (type == DType::IQ4_NL) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t b = 0; b < nb; ++b)
        quantize_iq4_nl_block(src + r * cols + b * 32, xc + r * cols + b * 32, importance ? importance + b * 32 : nullptr,
                              given(r, b), out + (r * nb + b) * 16, out + s.scales_offset() + (r * nb + b) * 2);
    return;
  }
  const int B = block;
  const int64_t code_bytes = type == DType::Q8_0 ? B : (type == DType::Q4 ? B / 2 : B / 4);
  const int64_t high_bytes = B / 8;  // q3 only
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = r * nb + b;
      quantize_block(type, B, src + r * cols + b * B, xc + r * cols + b * B, importance ? importance + b * B : nullptr,
                     given(r, b), out + g * code_bytes,
                     out + s.high_offset() + g * high_bytes, out + s.scales_offset() + g * 2);
    }
}

void block_scales(DType type, int block, const uint8_t* data, int64_t rows, int64_t cols, float* out) {
  const QuantSections s = quant_sections(type, rows, cols, block);
  const int64_t nb = cols / block;
  const uint8_t* scales = data + s.scales_offset();
  const auto f16_at = [&](int64_t i) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * i, 2);
    return f16_to_f32(h);
  };
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      if (!has_super_block(type)) { out[r * nb + b] = f16_at(r * nb + b); continue; }
      const int ls = sub_scale_code(data + s.sub_offset() + r * (nb / 2 + nb / 4), nb, b) - UPG_SUB_SCALE_BIAS;
      out[r * nb + b] = f16_at(r * (cols / UPG_SUPER_BLOCK) + b * block / UPG_SUPER_BLOCK) * float(ls);
    }
}

void super_scales(DType type, const uint8_t* data, int64_t rows, int64_t cols, float* out) {
  const uint8_t* scales = data + quant_sections(type, rows, cols, 32).scales_offset();
  for (int64_t i = 0; i < rows * (cols / UPG_SUPER_BLOCK); ++i) {
    uint16_t h;
    std::memcpy(&h, scales + 2 * i, 2);
    out[i] = f16_to_f32(h);
  }
}

void round_to_type(DType type, const float* x, const float* scale, int64_t n, float* out) {
  if (has_grid(type)) {
    const Grid& G = grid_of(type);
    for (int64_t i = 0; i < n; ++i) out[i] = scale[i] * float(G.g[grid_code(G, x[i], scale[i])]);
    return;
  }
  const UniformGrid g = uniform_grid(type);
  for (int64_t i = 0; i < n; ++i)
    out[i] = scale[i] * (float(uniform_code(x[i], scale[i], g.zero, g.lo, g.hi)) - g.zero);
}

}  // namespace upg
