// AVX-512 (F, BW, VL, DQ, VNNI) kernels: 16 f32 lanes per register, 32 registers.
// GCC 12's AVX-512 intrinsics initialize their "undefined" operands from themselves, which
// -Wuninitialized reports at every use (GCC bug 105593, fixed in GCC 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels/simd_kernels.h"

namespace upg {
namespace {

// The shifts and rotations of the two pairs, loaded (a table costs less than building them).
struct Iq3Shifts {
  alignas(64) int16_t lo[2][32];
  alignas(64) int32_t rot[2][16];
  alignas(64) int16_t quad_lo[32];     // iq3_quad_codes: 128-bit lane p shifts by 2p
  alignas(64) int32_t quad_rot[2][16]; // and rotates bit 2p (elements 0-15), 2p + 1 (16-31) to bit 2
  constexpr Iq3Shifts() : lo(), rot(), quad_lo(), quad_rot() {
    for (int pair = 0; pair < 2; ++pair) {
      for (int l = 0; l < 32; ++l) lo[pair][l] = int16_t(4 * pair + (l < 16 ? 0 : 2));
      for (int l = 0; l < 16; ++l) rot[pair][l] = (4 * pair + l / 4 - 2) & 31;
      for (int l = 0; l < 16; ++l) quad_rot[pair][l] = (2 * (l / 4) + pair - 2) & 31;
    }
    for (int l = 0; l < 32; ++l) quad_lo[l] = int16_t(2 * (l / 8));
  }
};
static constexpr Iq3Shifts kIq3Shifts{};

struct V512 {
  static constexpr int W = 16;
  static constexpr int kMatvecRows = 4;  // rows sharing each x load in matvec (best of 1..8)
  // dense matvec_n: 2 rows x 4 tokens share each row's loads and conversions (4 tokens of a
  // 2048 x 5120 f16 matrix: 0.84 ms against 1.05 with 4 rows a token at a time)
  static constexpr int kDenseRowsN = 2, kDenseTokensN = 4;
  // Quantized matvec rows at a time: 1 streamed fastest from memory on two cores (Phi-4-shaped q4:
  // 50 GB/s against 43 with 4 rows; the integer path has little to share between rows).
  static constexpr int kMatvecRowsI8 = 1;
  static constexpr int kMatvecRowsI8Short = 4;  // short rows (kShortRowBytes) at a time
  static constexpr int kMatvecTokens = 4;  // generated tokens per pass over a group of rows (matvec_n)
  // matvec_n's token kernel (rows_dot_tokens): 2 rows x 8 tokens of accumulators in registers
  static constexpr bool kTokensI8 = true;
  static constexpr int kTokensRows = 4, kTokensNT = 4;
  static constexpr int kMR = 3, kNT = 8;  // dense matmul register tile: 3 row vectors x 8 tokens (of 2x12, 2x14, 3x8, 4x6)
  using reg = __m512;
  using ireg = __m512i;

  static reg zero() { return _mm512_setzero_ps(); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg set1(float f) { return _mm512_set1_ps(f); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
  // Matvec rows' sums: four at once (one reduction for four rows), and one alone by the same
  // additions in the same order, so that a row's sum does not depend on the rows beside it.
  static __m256 fold(reg v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }
  static void hsum4(reg a, reg b, reg c, reg d, float* out) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a), fold(b)), _mm256_hadd_ps(fold(c), fold(d)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  static float hsum1(reg a) {
    const __m256 f = fold(a), h1 = _mm256_hadd_ps(f, f), h = _mm256_hadd_ps(h1, h1);
    return _mm_cvtss_f32(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }

  static reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static reg load_bf16(const uint16_t* p) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
  static void store_f16(uint16_t* p, reg v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // out[i] = f32(p[i]) * d[i] for i in [0, n), n <= kScaleGroup, stored as whole vectors (out has
  // room for them): a masked store would not forward to the loads that read out next (AMD), and
  // waiting for it cost SmolLM2-shaped q4 rows a fifth of their time.
  static void scaled_halves(const uint16_t* p, const float* d, int n, float* out) {
    for (int i = 0; i < n; i += W) {
      const __mmask16 m = n - i >= W ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + i)),
                                              _mm512_maskz_loadu_ps(m, d + i)));
    }
  }

  static __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static ireg widen_u8(const uint8_t* p) { return _mm512_cvtepu8_epi32(load16(p)); }
  static ireg widen_i8(const uint8_t* p) { return _mm512_cvtepi8_epi32(load16(p)); }
  // Lane l = p[idx[l]] of the first N bytes at p (N = 4, 8 or 16), zero-extended.
  template <int N>
  static ireg gather_bytes(const uint8_t* p, const int8_t* idx) {
    __m128i v;
    if constexpr (N == 16) v = load16(p);
    if constexpr (N == 8) v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    if constexpr (N == 4) {
      int32_t u;
      __builtin_memcpy(&u, p, 4);
      v = _mm_cvtsi32_si128(u);
    }
    return _mm512_cvtepu8_epi32(_mm_shuffle_epi8(v, load16(reinterpret_cast<const uint8_t*>(idx))));
  }
  static ireg srlv(ireg v, const int32_t* sh) { return _mm512_srlv_epi32(v, _mm512_loadu_si512(sh)); }
  template <int S>
  static ireg srli(ireg v) { return _mm512_srli_epi32(v, S); }
  template <int S>
  static ireg slli(ireg v) { return _mm512_slli_epi32(v, S); }
  static ireg and_(ireg v, int m) { return _mm512_and_si512(v, _mm512_set1_epi32(m)); }
  static ireg or_(ireg a, ireg b) { return _mm512_or_si512(a, b); }
  static ireg sub(ireg v, int m) { return _mm512_sub_epi32(v, _mm512_set1_epi32(m)); }
  static reg cvt(ireg v) { return _mm512_cvtepi32_ps(v); }

  // ---- 8-bit activations (simd_kernels.h): vpdpbusd on unsigned weight codes ----
  static constexpr int kNTi8 = 8;  // tokens per matmul register tile of one row vector (best of 4..12)
  // Row vectors x tokens of the wide tile: each broadcast feeds two rows of 16 (measured 2x4..2x7, 3x4)
  static constexpr int kMRi8 = 2, kNTi8Wide = 5;
  template <DType T>
  static constexpr int kZero = T == DType::Q8_0 || kGrid<T> ? 128 : zero_point(T);  // signed codes + 128
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static reg abs(reg v) { return _mm512_abs_ps(v); }
  static reg round(reg v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-126, 127], through the exponent bits.
  static reg pow2(reg n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static float hmax(reg v) { return _mm512_reduce_max_ps(v); }
  static ireg round_i32(reg v) { return _mm512_cvtps_epi32(v); }
  static void store_i8(int8_t* p, ireg v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v)); }
  static ireg izero() { return _mm512_setzero_si512(); }
  static ireg add_i32(ireg a, ireg b) { return _mm512_add_epi32(a, b); }
  static int32_t hsum_i32(ireg v) { return _mm512_reduce_add_epi32(v); }
  static ireg set1_i32(int32_t v) { return _mm512_set1_epi32(v); }
  static ireg load_i(const void* p) { return _mm512_loadu_si512(p); }
  static void store_i(void* p, ireg v) { _mm512_storeu_si512(p, v); }
  static ireg bcast4(const void* p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  // The 16 x 16 dwords r[i][j] (row i at rows + i * stride, dword j) into out + j * out_stride + i * 4:
  // four stages, stage k swapping bit k of the row and the dword index (two two-source permutes
  // per pair of rows).
  static void transpose_dwords(const uint8_t* rows, int64_t stride, uint8_t* out, int64_t out_stride) {
    static constexpr auto kIdx = [] {
      struct { alignas(64) int32_t lo[4][16]; alignas(64) int32_t hi[4][16]; } t{};
      for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 16; ++j) {
          const int d = 1 << k;
          t.lo[k][j] = (j & d) ? 16 + (j & ~d) : j;
          t.hi[k][j] = (j & d) ? 16 + j : (j | d);
        }
      return t;
    }();
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(rows + i * stride);
    for (int k = 0; k < 4; ++k) {
      const int d = 1 << k;
      const __m512i lo = _mm512_load_si512(kIdx.lo[k]), hi = _mm512_load_si512(kIdx.hi[k]);
      for (int i = 0; i < 16; ++i) {
        if (i & d) continue;
        const __m512i a = r[i], b = r[i | d];
        r[i] = _mm512_permutex2var_epi32(a, lo, b);
        r[i | d] = _mm512_permutex2var_epi32(a, hi, b);
      }
    }
    for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + j * out_stride, r[j]);
  }
  template <DType T>
  static ireg dpbusd(ireg acc, ireg w, ireg a) { return _mm512_dpbusd_epi32(acc, w, a); }
  template <DType T>
  static ireg dpbusd2(ireg acc, ireg w0, ireg a0, ireg w1, ireg a1) { return dpbusd<T>(dpbusd<T>(acc, w0, a0), w1, a1); }
  static ireg q8_codes(const uint8_t* p) { return _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(char(0x80))); }
  // 64 q4 codes from 32 bytes, in element order: one block of 64 (low nibbles, then high), or two
  // blocks of 32 (low and high nibbles of the first, then of the second). The 32 bytes are
  // broadcast so that each 128- or 256-bit part shifts its copy by 0 or 4.
  template <int B>
  static ireg q4_codes(const uint8_t* p, int) {
    __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    if constexpr (B == 32) {
      v = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(1, 1, 0, 0));
      shift = _mm512_mask_set1_epi16(_mm512_setzero_si512(), 0xff00ff00u, 4);
    }
    return _mm512_and_si512(_mm512_srlv_epi16(v, shift), _mm512_set1_epi8(15));
  }
  // 64 q3 codes (3 bits) in element order, from the ql (2-bit fields) and qh (1-bit) bytes of two
  // blocks of 32 or one of 64 (docs/FORMAT.md): each run of fields is broadcast to where its
  // elements go and shifted into place there; a high bit is rotated straight to bit 2 (rotations
  // by g - 2, mod the lane width), and one bitwise select joins the two.
  template <int B>
  static ireg q3_codes(const uint8_t* ql, const uint8_t* qh, int) {
    __m512i lo, hi;
    if constexpr (B == 32) {  // element 8f + i: ql byte i, field f; element 4g + i: qh byte i, bit g
      const __m512i q = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ql)));
      lo = _mm512_srlv_epi64(_mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), q),
                             _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6));
      const __m512i h = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qh)));
      hi = _mm512_rorv_epi32(
          _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), h),
          _mm512_setr_epi32(30, 31, 0, 1, 2, 3, 4, 5, 30, 31, 0, 1, 2, 3, 4, 5));
    } else {  // element 16f + i: ql byte i, field f; element 8g + i: qh byte i, bit g
      lo = _mm512_srlv_epi64(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ql))),
                             _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6));
      int64_t h;
      __builtin_memcpy(&h, qh, 8);
      hi = _mm512_rorv_epi64(_mm512_set1_epi64(h), _mm512_setr_epi64(62, 63, 0, 1, 2, 3, 4, 5));
    }
    // bits 0-1 from lo, 2-7 from hi (0xE4: C ? A : B, C = 0x03 per byte), then the 3 code bits
    const __m512i joined = _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(3), 0xE4);
    return _mm512_and_si512(joined, _mm512_set1_epi8(7));
  }
  // 64 iq3 codes (3 bits) of blocks p, p + 1 (p even) of a group of 4 (docs/FORMAT.md) in element
  // order, from the group's 32 ql and 16 qh bytes: the ql bytes broadcast to both halves and
  // shifted by 2p, 2p + 2; the qh bytes to the four 128-bit lanes, bit 2p + g of lane g rotated to
  // bit 2; one bitwise select joins them.
  static ireg iq3_codes(const uint8_t* ql, const uint8_t* qh, int p) {
    const int pair = p >> 1;
    const __m512i lo = _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql))),
                                         _mm512_load_si512(kIq3Shifts.lo[pair]));
    const __m512i hi = _mm512_and_si512(
        _mm512_rorv_epi32(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qh))),
                          _mm512_load_si512(kIq3Shifts.rot[pair])),
        _mm512_set1_epi8(4));
    return _mm512_ternarylogic_epi32(lo, hi, _mm512_set1_epi8(3), 0xE4);  // C ? A : B
  }
  // The 128 iq3 codes of a group of 4 blocks in the q4 quad order (q4_quad_codes): 128-bit lane p
  // of lo holds elements 0-15 of block p, of hi elements 16-31; one broadcast of each 16 ql bytes
  // and of the 16 qh bytes, and the same shifts for every group (loop constants).
  static constexpr bool kIq3Quad = true;
  static void iq3_quad_codes(const uint8_t* ql, const uint8_t* qh, ireg& lo, ireg& hi) {
    const auto b16 = [](const uint8_t* p) { return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); };
    const __m512i sh = _mm512_load_si512(kIq3Shifts.quad_lo), h = b16(qh), m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4);
    lo = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(b16(ql), sh),
                                   _mm512_and_si512(_mm512_rorv_epi32(h, _mm512_load_si512(kIq3Shifts.quad_rot[0])), m4), m3, 0xE4);
    hi = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(b16(ql + 16), sh),
                                   _mm512_and_si512(_mm512_rorv_epi32(h, _mm512_load_si512(kIq3Shifts.quad_rot[1])), m4), m3, 0xE4);
  }
  // Bytes t[code] of codes 0..15 (a grid in dot form, simd_kernels.h's kDotGrid).
  static ireg lut16(ireg codes, const uint8_t* t) {
    return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t))), codes);
  }
  // out[k] = the scale of sub-block b0 + k of a super-block row (its sub section, nb sub-blocks, its
  // f16 super-scales) times d[k], for k in [0, n), n a multiple of 8; whole vectors stored (as
  // scaled_halves). Masked loads: nothing past the row's bytes is read.
  static void super_scales(const uint8_t* sub, int64_t nb, const uint16_t* sup, int64_t b0, int n, const float* d,
                           float* out) {
    const __m128i lo_idx = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    const __m128i hi_idx = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i lo_shift = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i hi_shift = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    const __m512i sup_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int i = 0; i < n; i += W) {
      const int64_t j0 = b0 + i;
      const int m = n - i < W ? n - i : W;
      const __m128i lo = _mm_maskz_loadu_epi8(__mmask16((1u << (m / 2)) - 1), sub + j0 / 2);
      const __m128i hi = _mm_maskz_loadu_epi8(__mmask16((1u << (m / 4)) - 1), sub + nb / 2 + j0 / 4);
      const __m128i sp = _mm_maskz_loadu_epi16(__mmask8((1u << (m / 8)) - 1), sup + j0 / 8);
      const __m512i l = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(lo, lo_idx)), lo_shift),
                                         _mm512_set1_epi32(15));
      const __m512i h = _mm512_and_si512(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(hi, hi_idx)), hi_shift),
                                         _mm512_set1_epi32(3));
      const __m512i ls = _mm512_sub_epi32(_mm512_or_si512(l, _mm512_slli_epi32(h, 4)), _mm512_set1_epi32(UPG_SUB_SCALE_BIAS));
      const __m512 dsup = _mm512_permutexvar_ps(sup_idx, _mm512_castps256_ps512(_mm256_cvtph_ps(sp)));
      const __m512 dv = _mm512_maskz_loadu_ps(__mmask16((1u << m) - 1), d + i);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ls), dsup), dv));
    }
  }
  // The integer accumulator of a vector of P blocks: zs[p] (-zero x sum of codes) in the first
  // lane of block p, 0 elsewhere; one masked load or one permute, no scalar-to-vector moves.
  // P = 4: block p in lanes 4p..4p+3 (the q4 quad layout below).
  template <int P>
  static ireg acc_init(const int32_t* zs) {
    if constexpr (P == 1) return _mm512_maskz_loadu_epi32(1, zs);
    if constexpr (P == 4)
      return _mm512_maskz_permutexvar_epi32(0x1111, _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                            _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zs))));
    const __m512i pair = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zs)));
    return _mm512_maskz_permutexvar_epi32(0x0101, _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), pair);
  }
  template <int P>
  static reg block_scales(const float* s) {
    if constexpr (P == 1) return _mm512_set1_ps(s[0]);
    if constexpr (P == 4)
      return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                   _mm512_castps128_ps512(_mm_loadu_ps(s)));
    const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(pair));
  }
  // q4 with blocks of 32, four blocks a vector pair (rows_dot_i8's quad loop): 64 code bytes hold elements
  // 0-15 of the four blocks in their low nibbles and 16-31 in their high nibbles; the activations
  // of the same four blocks (128 bytes) are rearranged to match, once for all rows of a call.
  static constexpr bool kQ4Quad = true;
  static constexpr int kQuadBlocks = 4;
  static void q4_quad_codes(const uint8_t* p, ireg& lo, ireg& hi) {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i m = _mm512_set1_epi8(15);
    lo = _mm512_and_si512(v, m);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  }
  static void q4_quad_act(const int8_t* q, ireg& lo, ireg& hi) {
    const __m512i a = _mm512_loadu_si512(q), b = _mm512_loadu_si512(q + 64);  // blocks 0-1, 2-3
    lo = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0));  // first halves of blocks 0, 1, 2, 3
    hi = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1));  // second halves
  }
  static void store_n(float* p, reg v, int n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }
  static reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
};

}  // namespace

extern const Kernels kAvx512Kernels = make_kernels<V512>("avx512");

}  // namespace upg
#pragma GCC diagnostic pop
