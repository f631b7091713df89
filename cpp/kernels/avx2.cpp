// AVX2 + FMA + F16C kernels: 8 f32 lanes per register, 16 registers.
#include "kernels/simd_kernels.h"

namespace upg {
namespace {

struct V256 {
  static constexpr int W = 8;
  static constexpr int kMatvecRows = 4;  // rows sharing each x load in matvec (best of 2..4)
  static constexpr int kMR = 4, kNT = 3;  // matmul register tile: 12 accumulators
  using reg = __m256;
  using ireg = __m256i;

  static reg zero() { return _mm256_setzero_ps(); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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
  // out[0, n) = f32 of n halves.
  static void halves_to_f32(const uint16_t* p, int n, float* out) {
    int i = 0;
    for (; i + W <= n; i += W) store(out + i, load_f16(p + i));
    for (; i < n; ++i) out[i] = half_to_float(p[i]);
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

  // Grouped q3 (simd_kernels.h). vpermps is an 8-entry f32 table lookup, lane l = t[v[l] & 7]:
  // enough for q3's codes, not for q4's.
  static constexpr bool kLookup16 = false;
  static reg lookup(ireg v, reg table) { return _mm256_permutevar8x32_ps(table, v); }
  static reg q3_values() { return _mm256_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3); }
  static ireg load_codes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static ireg srl(ireg v, unsigned n) { return _mm256_srli_epi32(v, n); }
  static ireg sll(ireg v, unsigned n) { return _mm256_slli_epi32(v, n); }
  // Lane l = dword idx[l] of the 2W = 16 qh bytes at p.
  static ireg high_lanes(const uint8_t* p, const int32_t* idx) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_permutevar8x32_epi32(_mm256_castsi128_si256(h),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)));
  }
  // Bits 0-1 from lo, bits 2 and up from hi.
  static ireg low2_high(ireg lo, ireg hi) {
    const __m256i three = _mm256_set1_epi32(3);
    return _mm256_or_si256(_mm256_and_si256(lo, three), _mm256_andnot_si256(three, hi));
  }
  // The scale of each lane of a group of BPG blocks: lane l is in block l * BPG / 8.
  template <int BPG>
  static reg group_scales(const uint16_t* p) {
    __m128i h;
    if constexpr (BPG == 2) {
      uint32_t u;
      __builtin_memcpy(&u, p, 4);
      h = _mm_cvtsi32_si128(int32_t(u));
    }
    if constexpr (BPG == 4) h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m256i lane_block = _mm256_srli_epi32(
        _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(BPG)), 3);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_cvtph_ps(h)), lane_block);
  }
};

}  // namespace

extern const Kernels kAvx2Kernels = make_kernels<V256>("avx2");

}  // namespace upg
