// The SIMD kernels, written once over a vector traits type V that avx2.cpp and avx512.cpp define
// (V::W float lanes, V::kMR row vectors x V::kNT tokens dense matmul register tile, integer lane helpers).
//
// Included only by those two files and wrapped in an anonymous namespace, so each gets its own
// copy built with its own instruction set. For the same reason nothing here calls an inline
// function with external linkage (quant.h's converters): the linker could keep the copy compiled
// with AVX-512 for every caller, the baseline path included.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "upg/kernels.h"

namespace upg {
namespace {

// Tuning constant (quantized matmul): the columns of a packed tile of weight codes.
constexpr int64_t kTileK = 1024;
constexpr int kScaleGroup = 64;  // matvec: block scales converted to f32 per batch
// matvec: software prefetch. Rows are read R at a time, and R consecutive rows are one contiguous
// stretch of each stream, so the prefetch runs one group ahead: R rows' bytes further on, the same
// place in the next group (capped). With a fixed 2 KiB distance, short rows (Phi-4's 5120-wide
// q4 rows are 2.5 KiB) started every group cold: gate_up streamed at 15.6 GB/s on one core
// against 23.3 GB/s with this distance.
constexpr int64_t kMaxPrefetchBytes = 32768;
// matvec: quantized rows of at most this many code bytes are short (V::kMatvecRowsI8Short at a time).
constexpr int64_t kShortRowBytes = 1024;
// matvec_n: generated tokens whose token-side values the token kernel lays out at a time.
constexpr int64_t kMaxTokensI8 = 64;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
// quant.h's is_quantized, not called here (see top).
inline bool is_quantized_type(DType t) { return t != DType::F32 && t != DType::F16 && t != DType::BF16 && t != DType::I32; }
// quant.h's constexpr predicates, evaluated at compile time only (no call is emitted; see top)
template <DType T>
constexpr bool kGrid = has_grid(T);
template <DType T>
constexpr bool kSuper = has_super_block(T);
template <DType T>
constexpr bool kNibbles = T == DType::Q4 || T == DType::IQ4_NL || T == DType::IQ4_XS;  // q4's code packing
template <DType T>
constexpr bool kThreeBit = T == DType::Q3 || T == DType::IQ3;  // ql and qh sections
template <DType T, int B>
constexpr int kCodeBytesOf = T == DType::Q8_0 ? B : kNibbles<T> ? B / 2 : B / 4;  // per block: qs or ql

// A grid type's values in dot form (code -> grid value + zero, as a byte) for one pshufb.
template <DType T, int Z>
struct DotGrid {
  alignas(16) uint8_t v[16];
  constexpr DotGrid() : v() {
    for (int i = 0; i < (T == DType::IQ3 ? 8 : 16); ++i) v[i] = uint8_t((T == DType::IQ3 ? kIq3Grid[i] : kIq4Grid[i]) + Z);
  }
};
template <DType T, int Z>
constexpr DotGrid<T, Z> kDotGrid{};
template <DType T>
constexpr int grid_value(int q) { return T == DType::IQ3 ? kIq3Grid[q] : kIq4Grid[q]; }

// At least kMinPrefetchBytes: a group of short rows (SmolLM2's q4 rows are 324 bytes) is too short
// a distance to cover memory latency (576-wide q4 from DRAM: 15 GB/s on one core against 29 in
// cache with one group's distance).
constexpr int64_t kMinPrefetchBytes = 4096;
inline int64_t prefetch_distance(int64_t row_bytes, int rows_per_group) {
  const int64_t d = min64(row_bytes * rows_per_group, kMaxPrefetchBytes);
  return d < kMinPrefetchBytes ? kMinPrefetchBytes : d;
}
inline void prefetch(const void* p, int64_t distance) {
  _mm_prefetch(static_cast<const char*>(p) + distance, _MM_HINT_T0);
}
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// The scale of block g (= row * nb + block) of w as f32: its f16 scale, or for super-block types
// the super-scale times (ls - 32).
template <DType T, int B>
inline float weight_scale(const WeightView& w, int64_t g) {
  if constexpr (kSuper<T>) {
    const int64_t nb = w.cols / B, r = g / nb, j = g % nb;
    const int ls = sub_scale_code(w.sub + r * (nb / 2 + nb / 4), nb, j);
    return half_to_float(w.scales[g / (UPG_SUPER_BLOCK / B)]) * float(ls - UPG_SUB_SCALE_BIAS);
  } else {
    return half_to_float(w.scales[g]);
  }
}

// Which ql / qh byte and bit each lane of a q3 chunk reads (docs/FORMAT.md): element
// j = c * W + l of a block takes ql byte j % (B/4) at bit 2 * (j / (B/4)) and qh byte j % (B/8)
// at bit j / (B/8). Byte indices feed a pshufb, shifts a per-lane shift.
template <int B, int W>
struct Q3Lanes {
  static constexpr int kChunks = B / W;
  int8_t lo_byte[kChunks][16];
  int32_t lo_shift[kChunks][W];
  int8_t hi_byte[kChunks][16];
  int32_t hi_shift[kChunks][W];
  constexpr Q3Lanes() : lo_byte(), lo_shift(), hi_byte(), hi_shift() {
    for (int c = 0; c < kChunks; ++c)
      for (int l = 0; l < W; ++l) {
        const int j = c * W + l;
        lo_byte[c][l] = int8_t(j % (B / 4));
        lo_shift[c][l] = 2 * (j / (B / 4));
        hi_byte[c][l] = int8_t(j % (B / 8));
        hi_shift[c][l] = j / (B / 8);
      }
  }
};
template <int B, int W>
constexpr Q3Lanes<B, W> kQ3Lanes{};

// The codes of global block g (= row * nb + block) as B / W vectors of (q - zero point), unscaled.
template <class V, DType T, int B>
inline void decode_codes(const WeightView& w, int64_t g, typename V::reg* out) {
  constexpr int W = V::W, NC = B / W;
  if constexpr (T == DType::Q8_0) {
    const uint8_t* p = w.codes + g * B;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) out[c] = V::cvt(V::widen_i8(p + c * W));
  } else if constexpr (T == DType::Q4) {
    // Byte i holds element i (low nibble) and element i + B/2 (high nibble).
    const uint8_t* p = w.codes + g * (B / 2);
#pragma GCC unroll 8
    for (int c = 0; c < NC / 2; ++c) {
      const auto v = V::widen_u8(p + c * W);
      out[c] = V::cvt(V::sub(V::and_(v, 15), UPG_Q4_ZERO));
      out[NC / 2 + c] = V::cvt(V::sub(V::template srli<4>(v), UPG_Q4_ZERO));
    }
  } else {
    static_assert(T == DType::Q3, "quantized types only");
    const uint8_t* ql = w.codes + g * (B / 4);
    const uint8_t* qh = w.high + g * (B / 8);
    constexpr const Q3Lanes<B, W>& L = kQ3Lanes<B, W>;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const auto lo = V::and_(V::srlv(V::template gather_bytes<B / 4>(ql, L.lo_byte[c]), L.lo_shift[c]), 3);
      const auto hi = V::and_(V::srlv(V::template gather_bytes<B / 8>(qh, L.hi_byte[c]), L.hi_shift[c]), 1);
      out[c] = V::cvt(V::sub(V::or_(lo, V::template slli<2>(hi)), 4));
    }
  }
}

// W dense elements starting at element i, and one element (tails).
template <class V, DType T>
inline typename V::reg load_dense(const uint8_t* base, int64_t i) {
  if constexpr (T == DType::F32) return V::load(reinterpret_cast<const float*>(base) + i);
  if constexpr (T == DType::F16) return V::load_f16(reinterpret_cast<const uint16_t*>(base) + i);
  if constexpr (T == DType::BF16) return V::load_bf16(reinterpret_cast<const uint16_t*>(base) + i);
}
template <DType T>
inline float dense_at(const uint8_t* base, int64_t i) {
  if constexpr (T == DType::F32) return reinterpret_cast<const float*>(base)[i];
  const uint16_t h = reinterpret_cast<const uint16_t*>(base)[i];
  if constexpr (T == DType::F16) return half_to_float(h);
  uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline float outlier_dot(const WeightView& w, int64_t r, const float* x) {
  float s = 0.0f;
  for (int32_t i = w.o_rowptr[r]; i < w.o_rowptr[r + 1]; ++i) s += half_to_float(w.o_val[i]) * x[w.o_col[i]];
  return s;
}

// Calls f(integral_constant<DType, T>, integral_constant<int, B>) for w's type and block
// (B = 0 for dense types); the bindings and the engine have validated both.
template <class F>
inline void visit_type(const WeightView& w, F&& f) {
  using D = DType;
  const bool b64 = w.block == 64;
  switch (w.type) {
    case D::F32: return f(std::integral_constant<D, D::F32>{}, std::integral_constant<int, 0>{});
    case D::F16: return f(std::integral_constant<D, D::F16>{}, std::integral_constant<int, 0>{});
    case D::BF16: return f(std::integral_constant<D, D::BF16>{}, std::integral_constant<int, 0>{});
    case D::Q8_0:
      if (b64) return f(std::integral_constant<D, D::Q8_0>{}, std::integral_constant<int, 64>{});
      return f(std::integral_constant<D, D::Q8_0>{}, std::integral_constant<int, 32>{});
    case D::Q4:
      if (b64) return f(std::integral_constant<D, D::Q4>{}, std::integral_constant<int, 64>{});
      return f(std::integral_constant<D, D::Q4>{}, std::integral_constant<int, 32>{});
    case D::Q3:
      if (b64) return f(std::integral_constant<D, D::Q3>{}, std::integral_constant<int, 64>{});
      return f(std::integral_constant<D, D::Q3>{}, std::integral_constant<int, 32>{});
    case D::IQ4_NL: return f(std::integral_constant<D, D::IQ4_NL>{}, std::integral_constant<int, 32>{});  // block 32 only
    case D::IQ4_XS: return f(std::integral_constant<D, D::IQ4_XS>{}, std::integral_constant<int, 32>{});
    case D::IQ3: return f(std::integral_constant<D, D::IQ3>{}, std::integral_constant<int, 32>{});
    default: return;
  }
}

// ---- quantized weights against 8-bit activations (kernels.h) ----
//
// Each path keeps the weights' codes in a "dot form" that its integer dot product takes
// (V::dpbusd<T>): unsigned bytes code + V::kZero<T>, so the product of a block is
// dpbusd(-kZero * sum(activation codes), weight bytes, activation codes), exact in 32 bits.
// A vector holds E = 4W codes: P whole blocks (E >= B) or 1 / C of one block (B > E).
template <class V, DType T, int B>
struct I8Shape {
  static constexpr int E = 4 * V::W;
  static constexpr int P = E > B ? E / B : 1;
  static constexpr int C = B > E ? B / E : 1;
  static constexpr int kCodeBytes = kCodeBytesOf<T, B>;
  static constexpr int kZero = V::template kZero<T>;
};

template <DType T>
constexpr bool kActQ8 = T != DType::F32 && T != DType::F16 && T != DType::BF16 && T != DType::I32;

// Vector c of the codes of blocks g.. (P blocks, or part c of one block), in element order.
template <class V, DType T, int B>
inline typename V::ireg dot_codes(const WeightView& w, int64_t g, int c) {
  constexpr int Z = I8Shape<V, T, B>::kZero;
  if constexpr (T == DType::Q8_0) return V::q8_codes(w.codes + g * B + c * I8Shape<V, T, B>::E);
  else if constexpr (T == DType::Q4) return V::template q4_codes<B>(w.codes + g * (B / 2), c);
  else if constexpr (T == DType::Q3) return V::template q3_codes<B>(w.codes + g * (B / 4), w.high + g * (B / 8), c);
  else if constexpr (T == DType::IQ3)  // its group of 4 blocks: 32 ql bytes, 16 qh bytes
    return V::lut16(V::iq3_codes(w.codes + (g >> 2) * 32, w.high + (g >> 2) * 16, int(g & 3)), kDotGrid<T, Z>.v);
  else return V::lut16(V::template q4_codes<B>(w.codes + g * (B / 2), c), kDotGrid<T, Z>.v);
}

// Signed code of element j of block g (as the scale multiplies it), for the odd tail block.
template <DType T, int B>
inline int signed_code(const WeightView& w, int64_t g, int j) {
  if constexpr (T == DType::Q8_0) {
    return int8_t(w.codes[g * B + j]);
  } else if constexpr (kNibbles<T>) {
    const uint8_t byte = w.codes[g * (B / 2) + j % (B / 2)];
    const int q = j < B / 2 ? byte & 15 : byte >> 4;
    return kGrid<T> ? grid_value<T>(q) : q - UPG_Q4_ZERO;
  } else if constexpr (T == DType::IQ3) {
    return grid_value<T>(iq3_code(w.codes, w.high, g, j));
  } else {  // quant.h's q3_code, not called here (see top)
    const int lo = (w.codes[g * (B / 4) + j % (B / 4)] >> (2 * (j / (B / 4)))) & 3;
    const int hi = (w.high[g * (B / 8) + j % (B / 8)] >> (j / (B / 8))) & 1;
    return (lo | hi << 2) - UPG_Q3_ZERO;
  }
}

// Integer dot product of block g with 8-bit activation codes q (the odd tail block). Not
// vectorized: GCC 12 at -O3 with AVX-512 computes this loop wrongly for q8_0 codes.
template <DType T, int B>
__attribute__((noinline, optimize("no-tree-vectorize"))) int32_t block_dot_i8(const WeightView& w, int64_t g,
                                                                              const int8_t* q) {
  int32_t s = 0;
  for (int j = 0; j < B; ++j) s += signed_code<T, B>(w, g, j) * q[j];
  return s;
}

template <class V>
void quantize_act(const float* x, int64_t n, int block, int8_t* q, float* d, int32_t* sum) {
  constexpr int W = V::W;
  for (int64_t b = 0; b < n / block; ++b) {
    const float* xb = x + b * block;
    auto m = V::zero();
    for (int c = 0; c < block / W; ++c) m = V::max(m, V::abs(V::load(xb + c * W)));
    const float amax = V::hmax(m);
    d[b] = half_to_float(_cvtss_sh(amax / 127.0f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const auto id = V::set1(amax != 0.0f ? 127.0f / amax : 0.0f);
    auto s = V::izero();
    for (int c = 0; c < block / W; ++c) {
      const auto v = V::round_i32(V::mul(V::load(xb + c * W), id));  // half to even (MXCSR)
      V::store_i8(q + b * block + c * W, v);
      s = V::add_i32(s, v);
    }
    sum[b] = V::hsum_i32(s);
  }
}

// out[i] = the sum of v[i]'s lanes, for R rows (R = 1 or a multiple of 4): V::hsum4 and V::hsum1
// add in the same order, so a row's sum is the same whichever rows share its call.
template <class V, int R>
inline void row_sums(const typename V::reg* v, float* out) {
  if constexpr (R % 4 == 0) {
    for (int i = 0; i < R; i += 4) V::hsum4(v[i], v[i + 1], v[i + 2], v[i + 3], out + i);
  } else {
    for (int i = 0; i < R; ++i) out[i] = V::hsum1(v[i]);
  }
}

// out[j][i] = dot(row r + i, token j's x) for R rows and NT tokens: per vector of codes one integer
// dot product per token, the codes decoded once for the NT tokens, activation loads shared across
// the R rows, one float scale step per vector and token. Each (row, token) keeps U accumulators
// that consecutive vectors take in turn, so that no vector waits for the previous one's FMA (with
// one, a row was bound by FMA latency: 4 cycles per vector, q3 in cache at 20 GB/s). U depends on
// the path and the row length only, not on R or NT, and every token's accumulators see the same
// operations in the same order as the token alone: a row sums in the same order whichever rows
// and tokens share its call, so results do not depend on how rows are split between threads or
// how many generated tokens a pass holds. zs[j]: -zero point x sum of activation codes of every
// block of token j (row-independent, computed once per call of matvec).
template <class V, DType T, int B, int R, int U, int NT = 1>
inline void rows_dot_i8(const WeightView& w, const ActQ8* a, const int32_t* const* zs, int64_t r, float* const* out) {
  using S = I8Shape<V, T, B>;
  constexpr int P = S::P, C = S::C, E = S::E;
  const int64_t nb = w.cols / B, nbv = nb / P * P;  // blocks in whole vectors
  const int64_t pf = prefetch_distance(nb * S::kCodeBytes, R);
  typename V::reg acc[NT][R][U];
  float tail[NT][R];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < R; ++i) {
      for (int u = 0; u < U; ++u) acc[j][i][u] = V::zero();
      tail[j][i] = 0.0f;
    }
  alignas(64) float sd[NT][R][kScaleGroup];  // weight scale x activation scale, per block
  for (int64_t b0 = 0; b0 < nb; b0 += kScaleGroup) {
    const int n = int(min64(kScaleGroup, nb - b0));
    // the scales are a stream of their own, an eighth to a sixteenth of the codes' bytes; the
    // super-block types' sub-scales (3/4 byte a block) and super-scales (1/4) are two more
    if constexpr (kSuper<T>) {
      prefetch(w.sub + r * (nb / 2 + nb / 4) + b0 / 2, pf * 3 / (4 * S::kCodeBytes));
      prefetch(w.scales + r * (nb / 8) + b0 / 8, pf / (4 * S::kCodeBytes));
    } else {
      prefetch(w.scales + r * nb + b0, pf / (S::kCodeBytes / 2));
    }
    // Whole vectors (a scalar loop here cost short rows more than their dot products did: SmolLM2's
    // 576-wide q4 rows ran at 13 GB/s in cache).
    for (int j = 0; j < NT; ++j)
      for (int i = 0; i < R; ++i) {
        if constexpr (kSuper<T>)
          V::super_scales(w.sub + (r + i) * (nb / 2 + nb / 4), nb, w.scales + (r + i) * (nb / 8), b0, n, a[j].d + b0, sd[j][i]);
        else V::scaled_halves(w.scales + (r + i) * nb + b0, a[j].d + b0, n, sd[j][i]);
      }
    int64_t bq = b0;  // blocks [b0, bq) went through the quad loop
    if constexpr (B == 32 && ((kNibbles<T> && V::kQ4Quad) || (T == DType::IQ3 && V::kIq3Quad))) {
      // Q = V::kQuadBlocks blocks at a time (V::q4_quad_codes; 4 on AVX-512, 2 on AVX2): 1 load and
      // 3 bit operations for 4 x 32 codes where the pair loop below takes 2 loads and 6 (SmolLM2-shaped
      // q4 in cache 21 -> 30 GB/s on one core; on AVX2 the two blocks' scaling is one FMA, not two).
      // iq3: one group of its codes (V::iq3_quad_codes), in the same order.
      constexpr int Q = V::kQuadBlocks;
      const int64_t qend = b0 + n / Q * Q;
      for (int64_t bu = b0; bu < qend; bu += U * Q)
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          const int64_t b = bu + u * Q;
          if (U > 1 && b >= qend) break;
          typename V::ireg init[NT], alo[NT], ahi[NT];
          for (int j = 0; j < NT; ++j) {
            init[j] = V::template acc_init<Q>(zs[j] + b);
            V::q4_quad_act(a[j].q + b * B, alo[j], ahi[j]);
          }
#pragma GCC unroll 4
          for (int i = 0; i < R; ++i) {
            const int64_t g = (r + i) * nb + b;
            prefetch(w.codes + g * S::kCodeBytes, pf);
            typename V::ireg lo, hi;
            if constexpr (T == DType::IQ3) {
              prefetch(w.high + g * (B / 8), pf / 2);
              V::iq3_quad_codes(w.codes + g * S::kCodeBytes, w.high + g * (B / 8), lo, hi);
            } else {
              V::q4_quad_codes(w.codes + g * S::kCodeBytes, lo, hi);
            }
            if constexpr (kGrid<T>) {
              lo = V::lut16(lo, kDotGrid<T, S::kZero>.v);
              hi = V::lut16(hi, kDotGrid<T, S::kZero>.v);
            }
#pragma GCC unroll 8
            for (int j = 0; j < NT; ++j) {
              const auto s = V::template dpbusd2<T>(init[j], lo, alo[j], hi, ahi[j]);
              acc[j][i][u] = V::fma(V::cvt(s), V::template block_scales<Q>(sd[j][i] + (b - b0)), acc[j][i][u]);
            }
          }
        }
      bq = qend;
    }
    const int64_t bend = min64(b0 + n, nbv);
    for (int64_t bu = bq; bu < bend; bu += U * P)
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {  // vector u of this turn into accumulator u
        const int64_t b = bu + u * P;
        if (U > 1 && b >= bend) break;
        typename V::ireg init[NT], av[NT][C];
        for (int j = 0; j < NT; ++j) {
          init[j] = V::izero();
          if constexpr (S::kZero != 0) init[j] = V::template acc_init<P>(zs[j] + b);
          for (int c = 0; c < C; ++c) av[j][c] = V::load_i(a[j].q + b * B + c * E);
        }
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) {
          const int64_t g = (r + i) * nb + b;
          prefetch(w.codes + g * S::kCodeBytes, pf);
          if constexpr (kThreeBit<T>) prefetch(w.high + g * (B / 8), pf / 2);
          typename V::ireg codes[C];
          for (int c = 0; c < C; ++c) codes[c] = dot_codes<V, T, B>(w, g, c);
#pragma GCC unroll 8
          for (int j = 0; j < NT; ++j) {
            auto s = init[j];
            if constexpr (C == 2) s = V::template dpbusd2<T>(s, codes[0], av[j][0], codes[1], av[j][1]);
            else
              for (int c = 0; c < C; ++c) s = V::template dpbusd<T>(s, codes[c], av[j][c]);
            acc[j][i][u] = V::fma(V::cvt(s), V::template block_scales<P>(sd[j][i] + (b - b0)), acc[j][i][u]);
          }
        }
      }
    for (int64_t b = bend; b < b0 + n; ++b)  // a last block that fills half a vector
      for (int j = 0; j < NT; ++j)
        for (int i = 0; i < R; ++i)
          tail[j][i] += sd[j][i][b - b0] * float(block_dot_i8<T, B>(w, (r + i) * nb + b, a[j].q + b * B));
  }
  for (int j = 0; j < NT; ++j) {
    typename V::reg sum[R];
    for (int i = 0; i < R; ++i) {
      sum[i] = acc[j][i][0];
      for (int u = 1; u < U; ++u) sum[i] = V::add(sum[i], acc[j][i][u]);
    }
    row_sums<V, R>(sum, out[j]);
    for (int i = 0; i < R; ++i) out[j][i] += tail[j][i];
  }
}

// rows_dot_i8 for nt <= NT tokens (the tokens left over after groups of NT).
template <class V, DType T, int B, int R, int U, int NT>
inline void rows_dot_i8_n(int nt, const WeightView& w, const ActQ8* a, const int32_t* const* zs, int64_t r,
                          float* const* out) {
  if constexpr (NT > 1) {
    if (nt < NT) return rows_dot_i8_n<V, T, B, R, U, NT - 1>(nt, w, a, zs, r, out);
  }
  rows_dot_i8<V, T, B, R, U, NT>(w, a, zs, r, out);
}

// Activation scales of 1, for expanding weight scales alone with the mat-vec's helpers.
struct Ones {
  alignas(64) float v[kTileK / 32 + 16];
  constexpr Ones() : v() {
    for (float& x : v) x = 1.0f;
  }
};
inline constexpr Ones kOnes{};

// ---- matvec of several generated tokens ----

// The vector of the integer dot product for the token kernel below: NV blocks in NI registers (the
// nibble types with blocks of 32: V::q4_quad_codes' four blocks in two; else I8Shape's). It takes
// the types without a high-bit section (q3 and iq3 keep rows_dot_i8's several accumulators, which
// their short vectors need to stream at the bandwidth), on paths that have V::kTokensI8.
template <class V, DType T, int B>
struct TokenVecI8 {
  using S = I8Shape<V, T, B>;
  static constexpr bool kQuad = B == 32 && kNibbles<T> && V::kQ4Quad && V::kQuadBlocks == 4;
  static constexpr int NV = kQuad ? 4 : S::P;
  static constexpr int NI = kQuad ? 2 : S::C;
  static constexpr bool kOn = V::kTokensI8 && !kThreeBit<T>;
};

// f32 block scales of row r (sub-scale x super-scale for the super-block types), as rows_dot_i8's
// helpers compute them before they multiply the activation scales (here by 1: the same bits).
template <class V, DType T, int B>
inline void row_block_scales(const WeightView& w, int64_t r, int64_t nb, float* out) {
  constexpr int kChunk = 32;  // within kOnes
  for (int64_t b0 = 0; b0 < nb; b0 += kChunk) {
    const int n = int(min64(kChunk, nb - b0));
    if constexpr (kSuper<T>)
      V::super_scales(w.sub + r * (nb / 2 + nb / 4), nb, w.scales + r * (nb / 8), b0, n, kOnes.v, out + b0);
    else V::scaled_halves(w.scales + r * nb + b0, kOnes.v, n, out + b0);
  }
}

// What the token kernel reads per token and vector, laid out once per call (the same for every
// row): the zero-point term as acc_init places it, the activation scales spread over their blocks'
// lanes as block_scales spreads them, and for the quad layout the activation codes in the codes'
// order (q4_quad_act); other layouts read the codes where they are.
template <class V, DType T, int B>
struct TokenActsI8 {
  using TV = TokenVecI8<V, T, B>;
  static constexpr int W = V::W, NV = TV::NV, NI = TV::NI, E = TV::S::E;
  const int32_t* init = nullptr;  // [token][vector][W]
  const float* scale = nullptr;   // [token][vector][W]
  const int8_t* q = nullptr;      // quad: [token][vector][NI][E]; else null
  const ActQ8* act = nullptr;     // [token]
  const int32_t* const* zs = nullptr;  // [token]: the zero-point terms per block (the pair tail's)
  int64_t nv = 0;

  TokenActsI8(const ActQ8* a, const int32_t* const* z, int64_t n_tok, int64_t nb) : act(a), zs(z), nv(nb / NV) {
    static thread_local std::vector<uint8_t> buf;
    const int64_t per = nv * (2 * W * 4 + (TV::kQuad ? NI * E : 0));
    buf.resize(size_t(n_tok * per + 64));
    uint8_t* p = buf.data() + (64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64;
    auto* in = reinterpret_cast<int32_t*>(p);
    auto* sc = reinterpret_cast<float*>(p + n_tok * nv * W * 4);
    auto* qq = reinterpret_cast<int8_t*>(p + 2 * n_tok * nv * W * 4);
    for (int64_t j = 0; j < n_tok; ++j)
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t k = j * nv + v, b = v * NV;
        V::store_i(in + k * W, V::template acc_init<NV>(z[j] + b));
        V::store(sc + k * W, V::template block_scales<NV>(a[j].d + b));
        if constexpr (TV::kQuad) {
          typename V::ireg lo, hi;
          V::q4_quad_act(a[j].q + b * B, lo, hi);
          V::store_i(qq + (k * NI) * E, lo);
          V::store_i(qq + (k * NI + 1) * E, hi);
        }
      }
    init = in;
    scale = sc;
    q = TV::kQuad ? qq : nullptr;
  }
};

// y[t * ldy + r + i] = dot(row r + i, token t) for R rows and tokens [t0, t0 + NT): the codes and
// weight scales of a vector are decoded once for the NT tokens, each token's loads shared by the
// R rows, one accumulator per (row, token) in registers. Each (row, token) takes the operations of
// rows_dot_i8 with U = 1 in the same order (the same integer sums, the same scale products
// f32(scale) x activation scale, one FMA chain over the vectors, hsum1): bit-identical to the
// token alone.
// scales: row r + i's f32 block scales at scales + i * ns (row_block_scales).
template <class V, DType T, int B, int R, int NT>
inline void rows_dot_tokens(const WeightView& w, const TokenActsI8<V, T, B>& ta, const float* scales, int64_t ns,
                            int64_t t0, int64_t r, float* y, int64_t ldy) {
  using TV = TokenVecI8<V, T, B>;
  using S = typename TV::S;
  constexpr int W = V::W, NV = TV::NV, NI = TV::NI, E = S::E;
  const int64_t nb = w.cols / B, nv = ta.nv;
  const int64_t pf = prefetch_distance(nb * S::kCodeBytes, R);
  typename V::reg acc[NT][R];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < R; ++i) acc[j][i] = V::zero();
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t b = v * NV;
    typename V::ireg codes[R][NI];
    typename V::reg ws[R];
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const int64_t g = (r + i) * nb + b;
      prefetch(w.codes + g * S::kCodeBytes, pf);
      if constexpr (TV::kQuad) {
        V::q4_quad_codes(w.codes + g * S::kCodeBytes, codes[i][0], codes[i][1]);
        if constexpr (kGrid<T>)
          for (int c = 0; c < NI; ++c) codes[i][c] = V::lut16(codes[i][c], kDotGrid<T, S::kZero>.v);
      } else {
        for (int c = 0; c < NI; ++c) codes[i][c] = dot_codes<V, T, B>(w, g, c);
      }
      ws[i] = V::template block_scales<NV>(scales + i * ns + b);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NT; ++j) {
      const int64_t k = (t0 + j) * nv + v;
      const typename V::ireg init = V::load_i(ta.init + k * W);
      const typename V::reg as = V::load(ta.scale + k * W);
      typename V::ireg av[NI];
      for (int c = 0; c < NI; ++c)
        av[c] = TV::kQuad ? V::load_i(ta.q + (k * NI + c) * E) : V::load_i(ta.act[t0 + j].q + b * B + c * E);
      for (int i = 0; i < R; ++i) {
        auto s = init;
        for (int c = 0; c < NI; ++c) s = V::template dpbusd<T>(s, codes[i][c], av[c]);
        acc[j][i] = V::fma(V::cvt(s), V::mul(ws[i], as), acc[j][i]);
      }
    }
  }
  if constexpr (TV::kQuad) {
    // two blocks left (nb % 4 == 2): one vector of rows_dot_i8's pair loop, as it runs it
    if (nb % 4 == 2) {
      const int64_t b = nv * NV;
      typename V::ireg codes[R];
      typename V::reg ws[R];
      for (int i = 0; i < R; ++i) {
        codes[i] = dot_codes<V, T, B>(w, (r + i) * nb + b, 0);
        ws[i] = V::template block_scales<S::P>(scales + i * ns + b);
      }
      for (int j = 0; j < NT; ++j) {
        const ActQ8& a = ta.act[t0 + j];
        const typename V::ireg init = V::template acc_init<S::P>(ta.zs[t0 + j] + b);
        const typename V::reg as = V::template block_scales<S::P>(a.d + b);
        const typename V::ireg av = V::load_i(a.q + b * B);
        for (int i = 0; i < R; ++i)
          acc[j][i] = V::fma(V::cvt(V::template dpbusd<T>(init, codes[i], av)), V::mul(ws[i], as), acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < R; ++i) y[(t0 + j) * ldy + r + i] = V::hsum1(acc[j][i]) + 0.0f;  // + rows_dot_i8's empty tail
}

template <class V, DType T, int B, int R, int NT>
inline void rows_dot_tokens_n(int nt, const WeightView& w, const TokenActsI8<V, T, B>& ta, const float* scales,
                              int64_t ns, int64_t t0, int64_t r, float* y, int64_t ldy) {
  if constexpr (NT > 1) {
    if (nt < NT) return rows_dot_tokens_n<V, T, B, R, NT - 1>(nt, w, ta, scales, ns, t0, r, y, ldy);
  }
  rows_dot_tokens<V, T, B, R, NT>(w, ta, scales, ns, t0, r, y, ldy);
}


// Matmul tile for a group of W rows: the codes of columns [k0, k0 + kbn * B) in dot form, laid
// out [k / 4][row][4] so that one vector holds 4 consecutive codes of each of the W rows, and the
// f32 scales [block][row]. Rows past mr get zero scales (and contribute 0).
template <class V, DType T, int B>
inline void pack_tile_i8(const WeightView& w, int64_t r, int mr, int64_t k0, int64_t kbn, uint8_t* tile, float* tsc) {
  using S = I8Shape<V, T, B>;
  constexpr int W = V::W, P = S::P, C = S::C, E = S::E;
  const int64_t nb = w.cols / B, groups = kbn * B / 4;
  alignas(64) uint8_t rows[W][kTileK];  // each row's codes in dot form, then interleaved into tile
  constexpr int kScales = kTileK / B + W;  // per row: whole vectors are stored
  alignas(64) float scales[W][kScales];    // each row's block scales, then interleaved into tsc
  for (int i = 0; i < W; ++i) {
    uint8_t* row = rows[i];
    if (i >= mr) {
      __builtin_memset(row, 0, size_t(kbn * B));
      for (int64_t kb = 0; kb < kbn; ++kb) scales[i][kb] = 0.0f;
      continue;
    }
    const int64_t g0 = (r + i) * nb + k0 / B;
    int64_t kb = 0;
    for (; kb + P <= kbn; kb += P)
      for (int c = 0; c < C; ++c) V::store_i(row + kb * B + c * E, dot_codes<V, T, B>(w, g0 + kb, c));
    for (; kb < kbn; ++kb)
      for (int j = 0; j < B; ++j) row[kb * B + j] = uint8_t(signed_code<T, B>(w, g0 + kb, j) + S::kZero);
    // the scales as the mat-vec expands them (times activation scales of 1: exact)
    if constexpr (kSuper<T>)
      V::super_scales(w.sub + (r + i) * (nb / 2 + nb / 4), nb, w.scales + (r + i) * (nb / 8), k0 / B, int(kbn),
                      kOnes.v, scales[i]);
    else V::scaled_halves(w.scales + g0, kOnes.v, int(kbn), scales[i]);
  }
  // W groups of 4 codes of all W rows at a time as one dword transpose (one 4-byte copy per group
  // and row made packing most of a short prompt's mat-mul: a 4096 x 5120 q4 matrix took 3.7 ms
  // for 1 token against the mat-vec's 0.35)
  int64_t j = 0;
  for (; j + W <= groups; j += W) V::transpose_dwords(&rows[0][4 * j], kTileK, tile + j * W * 4, W * 4);
  for (; j < groups; ++j)
    for (int i = 0; i < W; ++i) __builtin_memcpy(tile + (j * W + i) * 4, &rows[i][4 * j], 4);
  int64_t b = 0;
  for (; b + W <= kbn; b += W)
    V::transpose_dwords(reinterpret_cast<const uint8_t*>(&scales[0][b]), kScales * 4, reinterpret_cast<uint8_t*>(tsc + b * W), W * 4);
  for (; b < kbn; ++b)
    for (int i = 0; i < W; ++i) tsc[b * W + i] = scales[i][b];
}

// Asks (into L2) for the bytes that pack_tile_i8 will read for rows [r, r1), columns
// [k0, k0 + kbn * B): its rows are 16 or more separate streams, which the hardware prefetchers do
// not follow. Measured +1-2% on a DRAM-sized mat-mul; the packing loads still stall (about 10%
// of Phi-4-shaped prefill in a profile), likely on TLB misses (4 KiB pages, 16+ pages a tile).
template <DType T, int B>
inline void prefetch_tile(const WeightView& w, int64_t r, int64_t r1, int64_t k0, int64_t kbn) {
  const int64_t nb = w.cols / B, b0 = k0 / B;
  constexpr int64_t kCodeBytes = kCodeBytesOf<T, B>;
  const auto l2 = [](const void* p, int64_t o) { _mm_prefetch(static_cast<const char*>(p) + o, _MM_HINT_T1); };
  for (; r < r1; ++r) {
    const int64_t g = r * nb + b0;
    for (int64_t o = 0; o < kbn * kCodeBytes; o += 64) l2(w.codes + g * kCodeBytes, o);
    if constexpr (kThreeBit<T>)
      for (int64_t o = 0; o < kbn * B / 8; o += 64) l2(w.high + g * (B / 8), o);
    if constexpr (kSuper<T>) {
      l2(w.sub + r * (nb / 2 + nb / 4) + b0 / 2, 0);
      l2(w.scales + g / (UPG_SUPER_BLOCK / B), 0);
    } else {
      for (int64_t o = 0; o < kbn * 2; o += 64) l2(w.scales + g, o);
    }
  }
}

// y[j * ldy + m * W + i] (+)= dot(row i of tile m, token t + j) for NT tokens and MR tiles of W
// rows (tile m at tile + m * kTileK * W, its scales at tsc + m * kTileK / B * W; of the last tile
// only the first mr rows are stored): lanes are rows, so each token's 4 codes are broadcast once
// for MR vectors of rows and no horizontal sum is needed. zs[j * nb + b]: token t + j's
// -zero x sum of codes of block b.
template <class V, DType T, int B, int NT, int MR>
inline void micro_tile_i8(const uint8_t* tile, const float* tsc, const ActQ8& a, const int32_t* zs, int64_t t,
                          int64_t k0, int64_t kbn, int64_t K, float* y, int64_t ldy, int mr, bool first) {
  constexpr int W = V::W, G = 4 * W, Z = I8Shape<V, T, B>::kZero;
  constexpr int64_t kTileStride = kTileK * W, kScaleStride = kTileK / B * W;
  const int64_t nb = K / B;
  typename V::reg acc[MR][NT];
  const int8_t* q[NT];
  const float* d[NT];
  const int32_t* z[NT];
  for (int j = 0; j < NT; ++j) {
    for (int m = 0; m < MR; ++m) acc[m][j] = V::zero();
    q[j] = a.q + (t + j) * K + k0;
    d[j] = a.d + (t + j) * nb + k0 / B;
    z[j] = Z ? zs + j * nb + k0 / B : nullptr;
  }
  for (int64_t kb = 0; kb < kbn; ++kb) {
    typename V::ireg s[MR][NT];
#pragma GCC unroll 12
    for (int j = 0; j < NT; ++j)
      for (int m = 0; m < MR; ++m) s[m][j] = Z ? V::set1_i32(z[j][kb]) : V::izero();
    const uint8_t* tb = tile + kb * (B / 4) * G;
#pragma GCC unroll 16
    for (int g = 0; g < B / 4; ++g) {
      typename V::ireg wv[MR];
      for (int m = 0; m < MR; ++m) wv[m] = V::load_i(tb + m * kTileStride + g * G);
#pragma GCC unroll 12
      for (int j = 0; j < NT; ++j) {
        const auto qj = V::bcast4(q[j] + kb * B + 4 * g);
        for (int m = 0; m < MR; ++m) s[m][j] = V::template dpbusd<T>(s[m][j], wv[m], qj);
      }
    }
    typename V::reg dw[MR];
    for (int m = 0; m < MR; ++m) dw[m] = V::load(tsc + m * kScaleStride + kb * W);
#pragma GCC unroll 12
    for (int j = 0; j < NT; ++j) {
      const auto dj = V::set1(d[j][kb]);
      for (int m = 0; m < MR; ++m) acc[m][j] = V::fma(V::cvt(s[m][j]), V::mul(dw[m], dj), acc[m][j]);
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int m = 0; m < MR; ++m) {
      float* o = y + j * ldy + m * W;
      const int n = m + 1 < MR ? W : mr;
      V::store_n(o, first ? acc[m][j] : V::add(V::load_n(o, n), acc[m][j]), n);
    }
}

template <class V, DType T, int B, int MR, int NT>
inline void micro_tile_i8_n(int nt, const uint8_t* tile, const float* tsc, const ActQ8& a, const int32_t* zs,
                            int64_t t, int64_t k0, int64_t kbn, int64_t K, float* y, int64_t ldy, int mr, bool first) {
  if constexpr (NT > 1) {
    if (nt < NT) return micro_tile_i8_n<V, T, B, MR, NT - 1>(nt, tile, tsc, a, zs, t, k0, kbn, K, y, ldy, mr, first);
  }
  micro_tile_i8<V, T, B, NT, MR>(tile, tsc, a, zs, t, k0, kbn, K, y, ldy, mr, first);
}

// Tokens that share one packing of a tile: a whole default batch (n_batch 512). Phi-4-shaped
// prefill of 512 tokens: 35.2 tok/s with blocks of 256, 37.5 with 512.
constexpr int64_t kTokenBlockI8 = 512;

template <class V, DType T, int B>
void matmul_i8(const WeightView& w, const ActQ8& a, int64_t n, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int W = V::W, MR = V::kMRi8;
  alignas(64) static thread_local uint8_t tile[MR][kTileK * W];
  alignas(64) static thread_local float tsc[MR][kTileK / B * W];
  static thread_local std::vector<int32_t> zs;  // -zero x sum of codes, [token of the block][block]
  constexpr int Z = I8Shape<V, T, B>::kZero;
  const int64_t K = w.cols, nb = K / B;
  if (Z) zs.resize(size_t(min64(n, kTokenBlockI8) * nb));
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlockI8) {
    const int64_t t1 = min64(n, t0 + kTokenBlockI8);
    if (Z)
      for (int64_t i = 0; i < (t1 - t0) * nb; ++i) zs[i] = -Z * a.sum[t0 * nb + i];
    for (int64_t r = r0; r < r1;) {
      // MR tiles while they are full, then one tile at a time
      const bool wide = r + MR * W <= r1;
      const int tiles = wide ? MR : 1;
      const int mr = int(min64(W, r1 - r - (tiles - 1) * W));
      for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
        const int64_t kbn = min64(kTileK, K - k0) / B;
        for (int m = 0; m < tiles; ++m)
          pack_tile_i8<V, T, B>(w, r + m * W, m + 1 < tiles ? W : mr, k0, kbn, tile[m], tsc[m]);
        // the next tile's weights arrive while the tokens run over this one
        if (k0 + kTileK < K)
          prefetch_tile<T, B>(w, r, r + (tiles - 1) * W + mr, k0 + kTileK, min64(kTileK, K - k0 - kTileK) / B);
        else if (r + tiles * W < r1)
          prefetch_tile<T, B>(w, r + tiles * W, min64(r1, r + (tiles + MR) * W), 0, min64(kTileK, K) / B);
        for (int64_t t = t0; t < t1;) {
          const int nt = int(min64(wide ? V::kNTi8Wide : V::kNTi8, t1 - t));
          const int32_t* z = Z ? zs.data() + (t - t0) * nb : nullptr;
          float* yt = y + t * ldy + r;
          if (wide)
            micro_tile_i8_n<V, T, B, MR, V::kNTi8Wide>(nt, tile[0], tsc[0], a, z, t, k0, kbn, K, yt, ldy, mr, k0 == 0);
          else
            micro_tile_i8_n<V, T, B, 1, V::kNTi8>(nt, tile[0], tsc[0], a, z, t, k0, kbn, K, yt, ldy, mr, k0 == 0);
          t += nt;
        }
      }
      r += tiles * W;
    }
  }
}

// ---- matvec ----

// out[j * ldo + i] = dot(row r + i, token j's x at x + j * ldx) for R rows and NT tokens: each
// row's loads (and f16 / bf16 conversions) shared by the NT tokens, each (row, token) summed in the
// same order whatever R and NT are (two accumulators taking alternate vectors, row_sums, then the
// scalar tail).
template <class V, DType T, int R, int NT = 1>
inline void rows_dot_dense(const WeightView& w, const float* x, int64_t ldx, int64_t r, float* out, int64_t ldo) {
  using reg = typename V::reg;
  constexpr int W = V::W;
  const int64_t K = w.cols;
  constexpr int kElem = T == DType::F32 ? 4 : 2;
  const int64_t pf = prefetch_distance(K * kElem, R);
  reg acc0[NT][R], acc1[NT][R];
  for (int j = 0; j < NT; ++j)
    for (int i = 0; i < R; ++i) acc0[j][i] = acc1[j][i] = V::zero();
  int64_t k = 0;
  for (; k + 2 * W <= K; k += 2 * W) {
    if constexpr (NT == 1) {  // each row's loads straight into its FMAs: no registers held for them
      const reg x0 = V::load(x + k), x1 = V::load(x + k + W);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        prefetch(w.codes + ((r + i) * K + k) * kElem, pf);
        acc0[0][i] = V::fma(load_dense<V, T>(w.codes, (r + i) * K + k), x0, acc0[0][i]);
        acc1[0][i] = V::fma(load_dense<V, T>(w.codes, (r + i) * K + k + W), x1, acc1[0][i]);
      }
    } else {
      reg w0[R], w1[R];
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) {
        prefetch(w.codes + ((r + i) * K + k) * kElem, pf);
        w0[i] = load_dense<V, T>(w.codes, (r + i) * K + k);
        w1[i] = load_dense<V, T>(w.codes, (r + i) * K + k + W);
      }
#pragma GCC unroll 4
      for (int j = 0; j < NT; ++j) {
        const reg x0 = V::load(x + j * ldx + k), x1 = V::load(x + j * ldx + k + W);
        for (int i = 0; i < R; ++i) {
          acc0[j][i] = V::fma(w0[i], x0, acc0[j][i]);
          acc1[j][i] = V::fma(w1[i], x1, acc1[j][i]);
        }
      }
    }
  }
  for (; k + W <= K; k += W) {
    reg w0[R];
    for (int i = 0; i < R; ++i) w0[i] = load_dense<V, T>(w.codes, (r + i) * K + k);
    for (int j = 0; j < NT; ++j) {
      const reg x0 = V::load(x + j * ldx + k);
      for (int i = 0; i < R; ++i) acc0[j][i] = V::fma(w0[i], x0, acc0[j][i]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    reg sum[R];
    for (int i = 0; i < R; ++i) sum[i] = V::add(acc0[j][i], acc1[j][i]);
    float* o = out + j * ldo;
    row_sums<V, R>(sum, o);
    for (int i = 0; i < R; ++i) {
      float s = o[i];
      for (int64_t kk = k; kk < K; ++kk) s += dense_at<T>(w.codes, (r + i) * K + kk) * x[j * ldx + kk];
      o[i] = s;
    }
  }
}

template <class V, DType T, int R, int NT>
inline void rows_dot_dense_n(int nt, const WeightView& w, const float* x, int64_t ldx, int64_t r, float* out,
                             int64_t ldo) {
  if constexpr (NT > 1) {
    if (nt < NT) return rows_dot_dense_n<V, T, R, NT - 1>(nt, w, x, ldx, r, out, ldo);
  }
  rows_dot_dense<V, T, R, NT>(w, x, ldx, r, out, ldo);
}

// Decode of n tokens: every token's row sums as matvec gives them for it alone (rows_dot_i8: the
// same operations per token); each group of rows is read from memory once for all n tokens,
// V::kMatvecTokens tokens per pass over it (more from cache).
template <class V>
void matvec_n(const WeightView& w, const float* x, const ActQ8& xq, int64_t n_tok, float* y, int64_t ldy,
              int64_t r0, int64_t r1) {
  visit_type(w, [&](auto t, auto b) {
    constexpr DType T = decltype(t)::value;
    constexpr int B = decltype(b)::value;
    if constexpr (kActQ8<T>) {
      const int64_t nb = w.cols / B;
      static thread_local std::vector<int32_t> zs;
      zs.resize(size_t(n_tok * nb));
      for (int64_t i = 0; i < n_tok * nb; ++i) zs[size_t(i)] = -I8Shape<V, T, B>::kZero * xq.sum[i];
      constexpr int NT = V::kMatvecTokens;
      // Short rows (SmolLM2's) go kMatvecRowsI8Short at a time: consecutive rows are one stretch of
      // memory then, and the rows share the activation loads and the per-call work.
      // Accumulators per row: enough independent FMA chains in the rows of one call (4 / rows), a
      // function of the shape only, so the tail rows of a chunk sum as the grouped ones do.
      // The token kernel's types sum each row in one chain (U = 1), alone too: a vector of theirs
      // streams from memory in more cycles than an FMA's latency.
      using TV = TokenVecI8<V, T, B>;
      constexpr int R = V::kMatvecRowsI8, RS = V::kMatvecRowsI8Short;
      constexpr int U = TV::kOn || R >= 4 ? 1 : 4 / R, US = RS >= 4 ? 1 : 4 / RS;
      const bool short_rows = nb * I8Shape<V, T, B>::kCodeBytes <= kShortRowBytes;
      const int rg = short_rows ? RS : R;
      if constexpr (TV::kOn) {
        // rows whose blocks fill whole vectors, and the quad types' rows with a pair of blocks left
        // (SmolLM2's 576 columns: 18 blocks)
        if (n_tok > 1 && (nb % TV::NV == 0 || (TV::kQuad && nb % 4 == 2))) {
          const int32_t* zp[kMaxTokensI8];
          ActQ8 acts[kMaxTokensI8];
          constexpr int RT = V::kTokensRows, NT = V::kTokensNT;
          for (int64_t c0 = 0; c0 < n_tok; c0 += kMaxTokensI8) {
            const int64_t nc = min64(kMaxTokensI8, n_tok - c0);
            for (int64_t j = 0; j < nc; ++j) {
              const int64_t tk = c0 + j;
              acts[j] = ActQ8{xq.block, xq.q + tk * w.cols, xq.d + tk * nb, xq.sum + tk * nb};
              zp[j] = zs.data() + tk * nb;
            }
            const TokenActsI8<V, T, B> ta(acts, zp, nc, nb);
            float* yc = y + c0 * ldy;
            static thread_local std::vector<float> scales;
            const int64_t ns = nb + 2 * V::W;  // scaled_halves stores whole vectors
            scales.resize(size_t(RT * ns));
            for (int64_t r = r0; r < r1;) {
              const bool whole = r + RT <= r1;
              for (int i = 0; i < (whole ? RT : 1); ++i) row_block_scales<V, T, B>(w, r + i, nb, scales.data() + i * ns);
              for (int64_t t0 = 0; t0 < nc; t0 += NT) {
                const int nt = int(min64(NT, nc - t0));
                if (whole) rows_dot_tokens_n<V, T, B, RT, NT>(nt, w, ta, scales.data(), ns, t0, r, yc, ldy);
                else rows_dot_tokens_n<V, T, B, 1, NT>(nt, w, ta, scales.data(), ns, t0, r, yc, ldy);
              }
              r += whole ? RT : 1;
            }
          }
          return;
        }
      }
      for (int64_t r = r0; r < r1;) {
        const bool whole = r + rg <= r1;
        for (int64_t t0 = 0; t0 < n_tok; t0 += NT) {
          const int nt = int(min64(NT, n_tok - t0));
          ActQ8 a[NT];
          const int32_t* z[NT];
          float* o[NT];
          for (int j = 0; j < nt; ++j) {
            const int64_t tk = t0 + j;
            a[j] = ActQ8{xq.block, xq.q + tk * w.cols, xq.d + tk * nb, xq.sum + tk * nb};
            z[j] = zs.data() + tk * nb;
            o[j] = y + tk * ldy + r;
          }
          if (short_rows) {
            if (whole) rows_dot_i8_n<V, T, B, RS, US, NT>(nt, w, a, z, r, o);
            else rows_dot_i8_n<V, T, B, 1, US, NT>(nt, w, a, z, r, o);
          } else {
            if (whole) rows_dot_i8_n<V, T, B, R, U, NT>(nt, w, a, z, r, o);
            else rows_dot_i8_n<V, T, B, 1, U, NT>(nt, w, a, z, r, o);
          }
        }
        r += whole ? rg : 1;
      }
    } else {
      // One token: kMatvecRows rows share each x load. Several (a pass's generated tokens, or the
      // query heads of one KV head in attention): kDenseRowsN rows x kDenseTokensN tokens share
      // each row's loads and conversions.
      const bool one = n_tok == 1;
      constexpr int R1 = V::kMatvecRows, RN = V::kDenseRowsN, NT = V::kDenseTokensN;
      const int rg = one ? R1 : RN;
      for (int64_t r = r0; r < r1;) {
        const bool whole = r + rg <= r1;
        for (int64_t t0 = 0; t0 < n_tok; t0 += NT) {
          const int nt = int(min64(NT, n_tok - t0));
          const float* xt = x + t0 * w.cols;
          float* yt = y + t0 * ldy + r;
          if (!whole) rows_dot_dense_n<V, T, 1, NT>(nt, w, xt, w.cols, r, yt, ldy);
          else if (one) rows_dot_dense<V, T, R1>(w, xt, w.cols, r, yt, ldy);
          else rows_dot_dense_n<V, T, RN, NT>(nt, w, xt, w.cols, r, yt, ldy);
        }
        r += whole ? rg : 1;
      }
    }
  });
  if (w.o_rowptr)
    for (int64_t tk = 0; tk < n_tok; ++tk)
      for (int64_t r = r0; r < r1; ++r) y[tk * ldy + r] += outlier_dot(w, r, x + tk * w.cols);
}

template <class V>
void matvec(const WeightView& w, const float* x, const ActQ8& xq, float* y, int64_t r0, int64_t r1) {
  matvec_n<V>(w, x, xq, 1, y, 0, r0, r1);
}

// ---- decode to f32 (matmul tiles, embedding rows) ----

// out[0, k1 - k0) = row r, columns [k0, k1), outliers excluded; quantized k0, k1 are block-aligned.
template <class V, DType T, int B>
inline void decode_range(const WeightView& w, int64_t r, int64_t k0, int64_t k1, float* out) {
  constexpr int W = V::W;
  if constexpr (B == 0) {
    const int64_t base = r * w.cols;
    int64_t k = k0;
    for (; k + W <= k1; k += W) V::store(out + (k - k0), load_dense<V, T>(w.codes, base + k));
    for (; k < k1; ++k) out[k - k0] = dense_at<T>(w.codes, base + k);
  } else {
    const int64_t nb = w.cols / B;
    if constexpr (kGrid<T>) {  // embedding rows only: plainly
      for (int64_t b = k0 / B; b < k1 / B; ++b) {
        const float d = weight_scale<T, B>(w, r * nb + b);
        for (int j = 0; j < B; ++j) out[b * B - k0 + j] = d * float(signed_code<T, B>(w, r * nb + b, j));
      }
    } else {
      for (int64_t b = k0 / B; b < k1 / B; ++b) {
        typename V::reg q[B / W];
        decode_codes<V, T, B>(w, r * nb + b, q);
        const auto d = V::set1(half_to_float(w.scales[r * nb + b]));
        float* o = out + (b * B - k0);
#pragma GCC unroll 8
        for (int c = 0; c < B / W; ++c) V::store(o + c * W, V::mul(q[c], d));
      }
    }
  }
}

template <class V>
void dequant_row(const WeightView& w, int64_t r, float* out) {
  visit_type(w, [&](auto t, auto b) {
    decode_range<V, decltype(t)::value, decltype(b)::value>(w, r, 0, w.cols, out);
  });
  if (w.o_rowptr)
    for (int32_t i = w.o_rowptr[r]; i < w.o_rowptr[r + 1]; ++i) out[w.o_col[i]] += half_to_float(w.o_val[i]);
}

// ---- matmul ----

// Dense weights (f32 / f16 / bf16): tiles of kMR * W rows x kTileKF columns decoded to f32 and
// laid out [k][row], so that one vector holds one column of W rows; each token's x[k] is
// broadcast against it and every lane accumulates its own row: no horizontal sums. A tile
// (96 KiB on AVX-512, read from L2: 256 and 128 columns measured slower) is reused by up to
// kTokenBlockF tokens, which also pays for its transposed packing. The earlier kernel summed
// along k and reduced each of its accumulators at the end of every tile: one core, f16,
// 576 x 1536 x 512 tokens 175 -> 230 GFLOP/s, 1024 x 5120 x 256 tokens 143 -> 192.
constexpr int64_t kTileKF = 512;
constexpr int64_t kTokenBlockF = 512;

// Rows [r, r + mr) of w, columns [k0, k0 + kc), into tile[k * kMR * W + i]; rows past mr are 0.
// Each row decoded in order, then W rows x W columns at a time interleaved as one dword transpose.
template <class V, DType T>
inline void pack_tile_f32(const WeightView& w, int64_t r, int mr, int64_t k0, int64_t kc, float* tile) {
  constexpr int W = V::W, RW = V::kMR * W;
  alignas(64) static thread_local float rows[RW][kTileKF];
  for (int i = 0; i < RW; ++i) {
    if (i < mr) decode_range<V, T, 0>(w, r + i, k0, k0 + kc, rows[i]);
    else __builtin_memset(rows[i], 0, size_t(kc) * sizeof(float));
  }
  int64_t k = 0;
  for (; k + W <= kc; k += W)
    for (int m = 0; m < V::kMR; ++m)
      V::transpose_dwords(reinterpret_cast<const uint8_t*>(&rows[m * W][k]), kTileKF * 4,
                          reinterpret_cast<uint8_t*>(tile + k * RW + m * W), RW * 4);
  for (; k < kc; ++k)
    for (int i = 0; i < RW; ++i) tile[k * RW + i] = rows[i][k];
}

// y[j * ldy + i] (+)= dot(tile row i, x row j) over the kc columns, for NT tokens and the first
// mr of the tile's kMR * W rows.
template <class V, int NT>
inline void micro_tile_f32(const float* tile, const float* x, int64_t ldx, int64_t kc, float* y, int64_t ldy,
                           int mr, bool first) {
  constexpr int W = V::W, MR = V::kMR, RW = MR * W;
  typename V::reg acc[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = V::zero();
  for (int64_t k = 0; k < kc; ++k) {
    typename V::reg wv[MR];
    for (int m = 0; m < MR; ++m) wv[m] = V::load(tile + k * RW + m * W);
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) {
      const auto xj = V::set1(x[j * ldx + k]);
      for (int m = 0; m < MR; ++m) acc[m][j] = V::fma(wv[m], xj, acc[m][j]);
    }
  }
  for (int j = 0; j < NT; ++j)
    for (int m = 0; m < MR; ++m) {
      const int n = mr - m * W < W ? mr - m * W : W;
      if (n <= 0) break;
      float* o = y + j * ldy + m * W;
      V::store_n(o, first ? acc[m][j] : V::add(V::load_n(o, n), acc[m][j]), n);
    }
}

template <class V, int NT = V::kNT>
inline void micro_tile_f32_n(int nt, const float* tile, const float* x, int64_t ldx, int64_t kc, float* y,
                             int64_t ldy, int mr, bool first) {
  if constexpr (NT > 1) {
    if (nt < NT) return micro_tile_f32_n<V, NT - 1>(nt, tile, x, ldx, kc, y, ldy, mr, first);
  }
  micro_tile_f32<V, NT>(tile, x, ldx, kc, y, ldy, mr, first);
}

template <class V>
void matmul(const WeightView& w, const float* x, const ActQ8& xq, int64_t n, float* y, int64_t ldy,
            int64_t r0, int64_t r1) {
  if (is_quantized_type(w.type)) {
    visit_type(w, [&](auto t, auto b) {
      if constexpr (kActQ8<decltype(t)::value>)
        matmul_i8<V, decltype(t)::value, decltype(b)::value>(w, xq, n, y, ldy, r0, r1);
    });
    if (w.o_rowptr)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r) y[t * ldy + r] += outlier_dot(w, r, x + t * w.cols);
    return;
  }
  constexpr int RW = V::kMR * V::W, NT = V::kNT;
  alignas(64) static thread_local float tile[kTileKF * RW];
  const int64_t K = w.cols;
  for (int64_t t0 = 0; t0 < n; t0 += kTokenBlockF) {
    const int64_t t1 = min64(n, t0 + kTokenBlockF);
    for (int64_t r = r0; r < r1; r += RW) {
      const int mr = int(min64(RW, r1 - r));
      for (int64_t k0 = 0; k0 < K; k0 += kTileKF) {
        const int64_t kc = min64(kTileKF, K - k0);
        visit_type(w, [&](auto t, auto) {
          if constexpr (!kActQ8<decltype(t)::value>) pack_tile_f32<V, decltype(t)::value>(w, r, mr, k0, kc, tile);
        });
        for (int64_t t = t0; t < t1; t += NT)
          micro_tile_f32_n<V>(int(min64(NT, t1 - t)), tile, x + t * K + k0, K, kc, y + t * ldy + r, ldy, mr, k0 == 0);
      }
      if (w.o_rowptr)
        for (int64_t t = t0; t < t1; ++t)
          for (int i = 0; i < mr; ++i) y[t * ldy + r + i] += outlier_dot(w, r + i, x + t * K);
    }
  }
}

// ---- attention helpers ----

// One definition for f32 and f16 KV rows: E is the row's element type.
template <class V>
inline typename V::reg load_row(const float* p) { return V::load(p); }
template <class V>
inline typename V::reg load_row(const uint16_t* p) { return V::load_f16(p); }
inline float to_float(float f) { return f; }
inline float to_float(uint16_t h) { return half_to_float(h); }

// y += sum_j a[j] x[j]: the outputs stay in registers across the rows, 4 vectors at a time (one
// head of 64, or a quarter of 256); each element takes its rows' FMAs in order, as repeated
// axpy calls did.
template <class V, typename E>
void axpy_rows(const float* a, const E* x, int64_t rows, float* y, int64_t n) {
  constexpr int W = V::W, NV = 4;
  int64_t i = 0;
  for (; i + NV * W <= n; i += NV * W) {
    typename V::reg acc[NV];
    for (int c = 0; c < NV; ++c) acc[c] = V::load(y + i + c * W);
    for (int64_t j = 0; j < rows; ++j) {
      const auto aj = V::set1(a[j]);
      for (int c = 0; c < NV; ++c) acc[c] = V::fma(aj, load_row<V>(x + j * n + i + c * W), acc[c]);
    }
    for (int c = 0; c < NV; ++c) V::store(y + i + c * W, acc[c]);
  }
  for (; i + W <= n; i += W) {
    auto acc = V::load(y + i);
    for (int64_t j = 0; j < rows; ++j) acc = V::fma(V::set1(a[j]), load_row<V>(x + j * n + i), acc);
    V::store(y + i, acc);
  }
  for (; i < n; ++i)
    for (int64_t j = 0; j < rows; ++j) y[i] += a[j] * to_float(x[j * n + i]);
}

template <class V>
void to_f16(const float* x, uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store_f16(y + i, V::load(x + i));
  for (; i < n; ++i) y[i] = _cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// ---- exp (softmax, SiLU) ----

// e^x per lane, as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact
// product), e^r from a degree-7 polynomial, 2^n through the exponent bits. Within 2 ulp of the
// true value; x is clamped to [-87.3, 88.3], so e^x stays finite and at least about 1e-38.
template <class V>
inline typename V::reg vexp(typename V::reg x) {
  x = V::max(V::min(x, V::set1(88.3762626647949f)), V::set1(-87.3365478515625f));
  const auto n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  auto r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  auto p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(p, V::mul(r, r), V::add(r, V::set1(1.0f)));
  return V::mul(p, V::pow2(n));
}

// y[i] = f(x[i]) for i in [0, n), W lanes at a time (x and y may be the same); the tail goes
// through a padded copy (pad: a value f takes without trouble), of which only n % W lanes are kept.
template <class V, class F>
inline void for_lanes(const float* x, float* y, int64_t n, float pad, F&& f) {
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(y + i, f(V::load(x + i), i));
  if (i == n) return;
  alignas(64) float t[V::W];
  for (int j = 0; j < V::W; ++j) t[j] = i + j < n ? x[i + j] : pad;
  V::store(t, f(V::load(t), i));
  for (int64_t j = i; j < n; ++j) y[j] = t[j - i];
}

template <class V>
float exp_shift_sum(float* x, int64_t n, float shift) {
  auto sum = V::zero();
  const int64_t full = n / V::W * V::W;
  for_lanes<V>(x, x, n, shift, [&](typename V::reg v, int64_t i) {
    const auto e = vexp<V>(V::add(v, V::set1(-shift)));
    if (i < full) sum = V::add(sum, e);
    return e;
  });
  float s = V::hsum(sum);
  for (int64_t j = full; j < n; ++j) s += x[j];
  return s;
}

template <class V>
void silu_mul(const float* g, const float* u, float* out, int64_t n) {
  for_lanes<V>(g, out, n, 0.0f, [](typename V::reg v, int64_t) {
    return V::div(v, V::add(vexp<V>(V::mul(v, V::set1(-1.0f))), V::set1(1.0f)));
  });
  for (int64_t i = 0; i < n; ++i) out[i] *= u[i];
}

template <class V>
constexpr Kernels make_kernels(const char* name) {
  return {name,          matvec<V>,        matvec_n<V>,       matmul<V>,         quantize_act<V>, dequant_row<V>,
          axpy_rows<V, float>, axpy_rows<V, uint16_t>, to_f16<V>, exp_shift_sum<V>, silu_mul<V>};
}

}  // namespace
}  // namespace upg
