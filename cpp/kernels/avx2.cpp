// AVX2 + FMA + F16C kernels: 8 f32 lanes per register, 16 registers.
#include "kernels/simd_kernels.h"

namespace upg {
namespace {

struct V256 {
  static constexpr int W = 8;
  static constexpr int kMatvecRows = 4;  // rows sharing each x load in matvec (best of 2..4)
  // dense matvec_n: a token at a time, 4 rows sharing each x load (16 registers: 1 row x 2 tokens
  // was 16% slower)
  static constexpr int kDenseRowsN = 4, kDenseTokensN = 1;
  // Quantized matvec rows at a time: this path is bound by instructions, so rows share the
  // activation loads (4 rows: 37 GB/s on two cores against 29 with 1).
  static constexpr int kMatvecRowsI8 = 4;
  static constexpr int kMatvecRowsI8Short = 4;  // short rows (kShortRowBytes) at a time
  static constexpr int kMatvecTokens = 2;  // generated tokens per pass over a group of rows (matvec_n)
  static constexpr bool kTokensI8 = false;  // matvec_n's token kernel: 16-lane paths only (rows already share loads here)
  static constexpr int kMR = 2, kNT = 6;  // dense matmul register tile: 2 row vectors x 6 tokens
  using reg = __m256;
  using ireg = __m256i;

  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // Matvec rows' sums: four at once (one reduction for four rows), and one alone by the same
  // additions in the same order, so that a row's sum does not depend on the rows beside it.
  static void hsum4(reg a, reg b, reg c, reg d, float* out) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static float hsum1(reg a) {
    const __m256 h1 = _mm256_hadd_ps(a, a), h = _mm256_hadd_ps(h1, h1);
    return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }

  static reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static reg load_bf16(const uint16_t* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  static void store_f16(uint16_t* p, reg v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // out[i] = f32(p[i]) * d[i] for i in [0, n), n <= kScaleGroup.
  static void scaled_halves(const uint16_t* p, const float* d, int n, float* out) {
    int i = 0;
    for (; i + W <= n; i += W) store(out + i, _mm256_mul_ps(load_f16(p + i), load(d + i)));
    for (; i < n; ++i) out[i] = half_to_float(p[i]) * d[i];
  }

  static __m128i load8(const uint8_t* p) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)); }
  static ireg widen_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(load8(p)); }
  static ireg widen_i8(const uint8_t* p) { return _mm256_cvtepi8_epi32(load8(p)); }
  // Lane l = p[idx[l]] of the first N bytes at p (N = 4, 8 or 16), zero-extended.
  template <int N>
  static ireg gather_bytes(const uint8_t* p, const int8_t* idx) {
    __m128i v;
    if constexpr (N == 16) v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (N == 8) v = load8(p);
    if constexpr (N == 4) {
      int32_t u;
      __builtin_memcpy(&u, p, 4);
      v = _mm_cvtsi32_si128(u);
    }
    return _mm256_cvtepu8_epi32(_mm_shuffle_epi8(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx))));
  }
  static ireg srlv(ireg v, const int32_t* sh) {
    return _mm256_srlv_epi32(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sh)));
  }
  template <int S>
  static ireg srli(ireg v) { return _mm256_srli_epi32(v, S); }
  template <int S>
  static ireg slli(ireg v) { return _mm256_slli_epi32(v, S); }
  static ireg and_(ireg v, int m) { return _mm256_and_si256(v, _mm256_set1_epi32(m)); }
  static ireg or_(ireg a, ireg b) { return _mm256_or_si256(a, b); }
  static ireg sub(ireg v, int m) { return _mm256_sub_epi32(v, _mm256_set1_epi32(m)); }
  static reg cvt(ireg v) { return _mm256_cvtepi32_ps(v); }

  // ---- 8-bit activations (simd_kernels.h): vpmaddubsw, whose pairs must not saturate ----
  // q4 / q3 codes stay unsigned (0..15 / 0..7); q8_0 codes stay signed and lend their sign to the
  // activations.
  static constexpr int kNTi8 = 4;  // tokens per matmul register tile
  static constexpr int kMRi8 = 1, kNTi8Wide = 4;  // one row vector per tile (16 registers)
  template <DType T>
  static constexpr int kZero = zero_point(T);  // grid types: signed values, as q8_0
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static reg abs(reg v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }
  static reg round(reg v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-126, 127], through the exponent bits.
  static reg pow2(reg n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float hmax(reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static ireg round_i32(reg v) { return _mm256_cvtps_epi32(v); }
  static void store_i8(int8_t* p, ireg v) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
  static ireg izero() { return _mm256_setzero_si256(); }
  static ireg add_i32(ireg a, ireg b) { return _mm256_add_epi32(a, b); }
  static int32_t hsum_i32(ireg v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
  }
  static ireg set1_i32(int32_t v) { return _mm256_set1_epi32(v); }
  static ireg load_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static void store_i(void* p, ireg v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
  static ireg bcast4(const void* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
  }
  // The 8 x 8 dwords r[i][j] (row i at rows + i * stride, dword j) into out + j * out_stride + i * 4.
  static void transpose_dwords(const uint8_t* rows, int64_t stride, uint8_t* out, int64_t out_stride) {
    __m256i r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + i * stride));
    for (int i = 0; i < 8; i += 2) {
      t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);      // per lane: r0[0] r1[0] r0[1] r1[1]
      t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);  //           r0[2] r1[2] r0[3] r1[3]
    }
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);      // dword 0 (4) of rows i..i+3
      u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);  // dword 1 (5)
      u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
      u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * out_stride), _mm256_permute2x128_si256(u[j], u[j + 4], 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (j + 4) * out_stride), _mm256_permute2x128_si256(u[j], u[j + 4], 0x31));
    }
  }
  // acc + the products of w and a summed in groups (exact: |pair| <= 128 * 127 * 2 < 2^15).
  template <DType T>
  static ireg dpbusd(ireg acc, ireg w, ireg a) {
    __m256i p;
    if constexpr (T == DType::Q4 || T == DType::Q3) p = _mm256_maddubs_epi16(w, a);  // codes <= 15
    else p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
  }
  // dpbusd(dpbusd(acc, w0, a0), w1, a1): for q4 and q3 the two 16-bit pair sums added first, one
  // vpmaddwd for both (exact: |pair| <= 15 * 128 * 2, two of them < 2^15).
  template <DType T>
  static ireg dpbusd2(ireg acc, ireg w0, ireg a0, ireg w1, ireg a1) {
    if constexpr (T == DType::Q4 || T == DType::Q3) {
      const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(w1, a1));
      return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    } else {
      return dpbusd<T>(dpbusd<T>(acc, w0, a0), w1, a1);
    }
  }
  static ireg q8_codes(const uint8_t* p) { return load_i(p); }
  // 32 q4 codes: a block of 32 from 16 bytes, or half c of a block of 64 from 32 bytes.
  template <int B>
  static ireg q4_codes(const uint8_t* p, int c) {
    const __m256i m = _mm256_set1_epi8(15);
    if constexpr (B == 64) return _mm256_and_si256(c ? _mm256_srli_epi16(load_i(p), 4) : load_i(p), m);
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m);
  }
  // 32 q3 codes (3 bits) in element order: a block of 32, or half c of a block of 64, from its ql
  // (2-bit fields) and qh (1-bit) bytes (docs/FORMAT.md), each run broadcast and shifted into place.
  template <int B>
  static ireg q3_codes(const uint8_t* ql, const uint8_t* qh, int c) {
    __m256i lo, hi;
    if constexpr (B == 32) {  // element 8f + i: ql byte i, field f; element 4g + i: qh byte i, bit g
      int64_t q;
      int32_t h;
      __builtin_memcpy(&q, ql, 8);
      __builtin_memcpy(&h, qh, 4);
      lo = _mm256_srlv_epi64(_mm256_set1_epi64x(q), _mm256_setr_epi64x(0, 2, 4, 6));
      hi = _mm256_srlv_epi32(_mm256_set1_epi32(h), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    } else {  // element 16f + i: ql byte i, field f; element 8g + i: qh byte i, bit g
      const int64_t s = 4 * c;
      lo = _mm256_srlv_epi64(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ql))),
                             _mm256_setr_epi64x(s, s, s + 2, s + 2));
      int64_t h;
      __builtin_memcpy(&h, qh, 8);
      hi = _mm256_srlv_epi64(_mm256_set1_epi64x(h), _mm256_setr_epi64x(s, s + 1, s + 2, s + 3));
    }
    return _mm256_or_si256(_mm256_and_si256(lo, _mm256_set1_epi8(3)),
                           _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi8(1)), 2));
  }
  // The 32 iq3 codes (3 bits) of block p of a group of 4 (docs/FORMAT.md), from the group's 32 ql
  // bytes (shifted by 2p) and 16 qh bytes (broadcast to both halves, shifted by 2p and 2p + 1).
  static ireg iq3_codes(const uint8_t* ql, const uint8_t* qh, int p) {
    const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(load_i(ql), _mm_cvtsi32_si128(2 * p)), _mm256_set1_epi8(3));
    alignas(32) static constexpr int32_t kHiShift[4][8] = {
        {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5}, {6, 6, 6, 6, 7, 7, 7, 7}};
    const __m256i h = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh))),
                                        load_i(kHiShift[p]));
    return _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 2));
  }
  // Bytes t[code] of codes 0..15 (a grid in dot form, simd_kernels.h's kDotGrid).
  static ireg lut16(ireg codes, const uint8_t* t) {
    return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(t))), codes);
  }
  // out[k] = the scale of sub-block b0 + k of a super-block row (its sub section, nb sub-blocks, its
  // f16 super-scales) times d[k], for k in [0, n), n a multiple of 8 (one super-block a vector).
  static void super_scales(const uint8_t* sub, int64_t nb, const uint16_t* sup, int64_t b0, int n, const float* d,
                           float* out) {
    const __m128i lo_idx = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128i hi_idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m256i lo_shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    const __m256i hi_shift = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    for (int i = 0; i < n; i += W) {
      const int64_t j0 = b0 + i;
      int32_t lo4;
      uint16_t hi2;
      __builtin_memcpy(&lo4, sub + j0 / 2, 4);
      __builtin_memcpy(&hi2, sub + nb / 2 + j0 / 4, 2);
      const __m256i l = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(lo4), lo_idx)), lo_shift),
          _mm256_set1_epi32(15));
      const __m256i h = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(hi2), hi_idx)), hi_shift),
          _mm256_set1_epi32(3));
      const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(l, _mm256_slli_epi32(h, 4)), _mm256_set1_epi32(UPG_SUB_SCALE_BIAS));
      const __m256 dsup = _mm256_set1_ps(_cvtsh_ss(sup[j0 / 8]));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(ls), dsup), _mm256_loadu_ps(d + i)));
    }
  }
  // The integer accumulator of a vector of P blocks: zs[p] (-zero x sum of codes) in the first lane
  // of block p, 0 elsewhere. P = 2: block p in lanes 4p..4p+3 (the q4 pair layout below).
  template <int P>
  static ireg acc_init(const int32_t* zs) {
    static_assert(P == 1 || P == 2, "a vector holds one block, or two in the q4 pair layout");
    if constexpr (P == 1) return _mm256_zextsi128_si256(_mm_cvtsi32_si128(zs[0]));
    return _mm256_set_m128i(_mm_cvtsi32_si128(zs[1]), _mm_cvtsi32_si128(zs[0]));
  }
  template <int P>
  static reg block_scales(const float* s) {
    if constexpr (P == 1) return _mm256_set1_ps(s[0]);
    const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(pair), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
  // q4 with blocks of 32, two blocks a vector pair (rows_dot_i8's quad loop): 32 code bytes hold
  // elements 0-15 of both blocks in their low nibbles and 16-31 in their high nibbles; the
  // activations of the same two blocks (64 bytes) are rearranged to match, once for the rows of a
  // call. Per row and block this is half the loads, shifts and FMAs of the one-block vectors.
  static constexpr bool kQ4Quad = true;
  static constexpr int kQuadBlocks = 2;
  static void q4_quad_codes(const uint8_t* p, ireg& lo, ireg& hi) {
    const __m256i v = load_i(p), m = _mm256_set1_epi8(15);
    lo = _mm256_and_si256(v, m);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  }
  static void q4_quad_act(const int8_t* q, ireg& lo, ireg& hi) {
    const __m256i a = load_i(q), b = load_i(q + 32);  // block 0, block 1
    lo = _mm256_permute2x128_si256(a, b, 0x20);        // first halves of blocks 0, 1
    hi = _mm256_permute2x128_si256(a, b, 0x31);        // second halves
  }
  static constexpr bool kIq3Quad = false;
  static __m256i first_n(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static void store_n(float* p, reg v, int n) { _mm256_maskstore_ps(p, first_n(n), v); }
  static reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, first_n(n)); }
};

}  // namespace

extern const Kernels kAvx2Kernels = make_kernels<V256>("avx2");

}  // namespace upg
