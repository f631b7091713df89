// Decode mat-vec: y[r] = sum_k W[r][k] x[k] (+ the row's outliers, same pass) for every UPG type,
// reading W in the file layout (no repack). x (f32) is staged once per block in shared memory,
// swizzled (common.cuh: swz) so that the lanes' 16-byte reads hit distinct bank groups. Each warp
// owns kMvRows rows at a time (the one-token kernel: 3 where that evens out the warps' rows); lane
// l takes the 16-byte code chunks l, l + 32, ... of those rows (consecutive lanes, consecutive
// chunks: one 512-byte coalesced read per row and step). Dense
// chunks are widened to f32 and multiplied with x; quantized ones multiply x rounded to 8 bits per
// block, as the CPU engine rounds it, with integer dot products (dp4a) per scale block; the grid
// types' codes become their int8 grid values in registers by byte_perm lookups (common.cuh). Row groups
// go round-robin over a grid of about (multiprocessors x resident blocks), so every block loads x
// once.
//
// Several tokens (matvec_n: the generated tokens of a step, up to kMvTokens a launch): each chunk of
// W is loaded once and multiplied with every token's x, and each token's sums run exactly as the
// one-token kernel runs them (the same lanes, chunks, order and warp reduction), so its result has
// the bits of that token alone. The tokens' 8-bit x (or, for dense W, f32 x) sit side by side in
// shared memory.
#include <algorithm>
#include <stdexcept>

#include "common.cuh"
#include "upg/quant.h"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kMvWarps = 16;
static_assert(kMvWarps * 32 == kNormThreads, "the fused rms_norm prologue sums as the rms_norm kernel's block does");
constexpr int kMvRows = 4;

template <int DT>
constexpr bool kGrid4 = DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS;

// Elements per lane chunk: 16 bytes of the codes (q3: NBL blocks of ql, 8 or 16 bytes; iq3: one
// group of 4 blocks, 32 bytes of ql and 16 of qh).
template <int DT, int B, int NBL>
__host__ __device__ constexpr int chunk_elems() {
  return DT == UPG_DTYPE_F32 ? 4 : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 8
       : DT == UPG_DTYPE_Q8_0 ? 16 : (DT == UPG_DTYPE_Q4 || kGrid4<DT>) ? 32 : DT == UPG_DTYPE_IQ3 ? 128 : NBL * B;
}
// Swizzle shift: log2 of the x units one lane reads per chunk (f32: lanes read consecutive units).
template <int DT, int B, int NBL>
__host__ __device__ constexpr int swizzle_shift() {
  return DT == UPG_DTYPE_F32 ? 3 : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 1
       : DT == UPG_DTYPE_Q8_0 ? 2 : (DT == UPG_DTYPE_Q4 || kGrid4<DT>) ? (B == 32 ? 3 : 4) : DT == UPG_DTYPE_IQ3 ? 5
       : (NBL * B == 64 ? 4 : 3);
}

struct Raw {
  uint4 q;     // codes (16 bytes; q3 with 32-element chunks: 8 in q.x, q.y; iq3: ql bytes 0..15)
  uint4 q2;    // iq3: ql bytes 16..31
  uint4 h;     // q3: qh (8 bytes in h.x, h.y, or 4 in h.x); iq3: qh (16 bytes)
  float d[4];  // scales of the chunk's blocks (q3: 1 or 2, iq3: 4, else 1)
};

template <int DT, int B, int NBL>
__device__ __forceinline__ Raw load_chunk(const MatView& m, int r, int c) {
  constexpr int CE = chunk_elems<DT, B, NBL>();
  Raw raw{};
  const int64_t e = int64_t(r) * m.cols + int64_t(c) * CE;  // first element (q4 b64: c * 32)
  if constexpr (DT == UPG_DTYPE_F32) raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + 4 * e));
  if constexpr (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + 2 * e));
  if constexpr (DT == UPG_DTYPE_Q8_0 || DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_Q3) {
    const int nb = m.cols / B;
    const int64_t srow = int64_t(r) * nb;
    if constexpr (DT == UPG_DTYPE_Q8_0) {
      raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e));
      raw.d[0] = f16(m.scales[srow + (c * 16) / B]);
    } else if constexpr (DT == UPG_DTYPE_Q4) {
      raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 2));
      raw.d[0] = f16(m.scales[srow + (c * 32) / B]);
    } else if constexpr (CE == 64) {
      raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 4));
      const uint2 h = __ldcs(reinterpret_cast<const uint2*>(m.high + e / 8));
      raw.h = make_uint4(h.x, h.y, 0, 0);
      raw.d[0] = f16(m.scales[srow + c * NBL]);
      raw.d[1] = NBL == 2 ? f16(m.scales[srow + c * NBL + 1]) : 0.0f;
    } else {
      const uint2 q = __ldcs(reinterpret_cast<const uint2*>(m.codes + e / 4));
      raw.q = make_uint4(q.x, q.y, 0, 0);
      raw.h.x = __ldcs(reinterpret_cast<const unsigned int*>(m.high + e / 8));
      raw.d[0] = f16(m.scales[srow + c]);
    }
  }
  if constexpr (kGrid4<DT>) {  // block c: 16 bytes
    raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 2));
    raw.d[0] = grid_scale<DT>(m.scales, m.sub, m.cols, r, c);
  }
  if constexpr (DT == UPG_DTYPE_IQ3) {  // group c: blocks 4c..4c+3 of super-block c / 2
    raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 4));
    raw.q2 = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 4 + 16));
    raw.h = __ldcs(reinterpret_cast<const uint4*>(m.high + e / 8));
    // the 6-bit codes ls of the 4 blocks: low nibbles in bytes 2c, 2c + 1, high bit pairs in byte nb / 2 + c
    const int nb = m.cols / 32;
    const uint8_t* sub = m.sub + int64_t(r) * (nb / 2 + nb / 4);
    const uint32_t lo = *reinterpret_cast<const uint16_t*>(sub + 2 * c), hi = sub[nb / 2 + c];
    const float d = f16(m.scales[int64_t(r) * (nb / 8) + c / 2]);
#pragma unroll
    for (int p = 0; p < 4; ++p)
      raw.d[p] = d * float(int(((lo >> (4 * p)) & 15) | (((hi >> (2 * p)) & 3) << 4)) - UPG_SUB_SCALE_BIAS);
  }
  return raw;
}

// Global x unit of local unit u of chunk c (a unit: 4 consecutive elements).
template <int DT, int B, int NBL>
__device__ __forceinline__ int x_unit(int c, int u) {
  constexpr int CE = chunk_elems<DT, B, NBL>();
  if constexpr (DT == UPG_DTYPE_Q4 && B == 64) {  // half h of block c/2: elements 16h.. and 32 + 16h..
    const int base = (c >> 1) * 16 + 4 * (c & 1);
    return base + (u < 4 ? u : u + 4);
  }
  return c * (CE / 4) + u;
}

__device__ __forceinline__ uint32_t shift_left(uint32_t v, int n) { return n >= 0 ? v << n : v >> -n; }

// Codes of a q3 word in bits 0..2 of its bytes, for the 8-bit products.
__device__ __forceinline__ uint32_t q3_codes(uint32_t ql, uint32_t qh, int k, int hs) {
  return (shift_left(ql, -2 * k) & 0x03030303u) | (shift_left(qh, 2 - hs) & 0x04040404u);
}

// ---- 8-bit activations (the CPU's rounding: reference.quant.quantize_activations) ----
// Quantized weights multiply x rounded per activation block of B elements, as the CPU kernels do:
// d = f16(amax / 127), q = rint(x * (127 / amax)). The codes sit in shared memory as 32-bit words
// (4 elements) in chunk order (word u of chunk c: the unit x_unit(c, u)), so a lane reads its
// chunk's words with G 16-byte loads; xq_group spreads the lanes of a quarter warp over the banks.
// iq4_nl and iq4_xs interleave each block's halves (byte 2j + h: element j + 16h, j < 16), the
// order of the nibbles of their code bytes, which their lookups keep (chunk_dot_q8).
template <int DT, int B, int NBL>
__host__ __device__ constexpr int chunk_groups() { return chunk_elems<DT, B, NBL>() / 16; }

template <int DT, int B, int NBL>
__device__ __forceinline__ int xq_group(int g) {
  constexpr int G = chunk_groups<DT, B, NBL>();
  return g ^ ((g >> 3) & (G - 1));
}

// Word index (chunk order) of global unit U: the inverse of x_unit.
template <int DT, int B, int NBL>
__device__ __forceinline__ int xq_word(int U) {
  if constexpr (DT == UPG_DTYPE_Q4 && B == 64) {
    const int r = U & 15;
    return ((U >> 4) * 2 + ((r >> 2) & 1)) * 8 + (r & 3) + 4 * (r >> 3);
  }
  return U;
}

// x (unit u: load(u), 4 floats) -> xq words and the activation scales xd [cols / B]. Consecutive
// threads hold consecutive units, so the B / 4 threads of one activation block reduce its amax
// together.
template <int DT, int B, int NBL, class Load>
__device__ void quantize_x(Load load, uint32_t* xq, float* xd, int cols) {
  constexpr int L = B / 4, U = 4;  // U units a thread loads before the first use (x may be in global memory)
  const int units = cols / 4;
  for (int u0 = 0; u0 < units; u0 += U * blockDim.x) {  // the same trip count in every lane: shuffles
    float4 v[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int u = u0 + i * blockDim.x + threadIdx.x;
      v[i] = u < units ? load(u) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int u = u0 + i * blockDim.x + threadIdx.x;
      float m = fmaxf(fmaxf(fabsf(v[i].x), fabsf(v[i].y)), fmaxf(fabsf(v[i].z), fabsf(v[i].w)));
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      const float inv = m != 0.0f ? 127.0f / m : 0.0f;
      uint32_t word = (uint32_t(__float2int_rn(v[i].x * inv)) & 0xffu) | (uint32_t(__float2int_rn(v[i].y * inv)) & 0xffu) << 8 |
                      (uint32_t(__float2int_rn(v[i].z * inv)) & 0xffu) << 16 | uint32_t(__float2int_rn(v[i].w * inv)) << 24;
      int w = xq_word<DT, B, NBL>(u);
      if constexpr (kGrid4<DT>) {  // unit lu < 4 of a block and unit lu + 4 make words 2 lu, 2 lu + 1 (all lanes shuffle)
        const uint32_t other = __shfl_xor_sync(0xffffffffu, word, 4);
        const int lu = u & 7;
        word = lu < 4 ? prmt(word, other, 0x5140) : prmt(other, word, 0x7362);
        w = (u & ~7) | (lu < 4 ? 2 * lu : 2 * lu - 7);
      }
      if (u >= units) continue;
      xq[xq_group<DT, B, NBL>(w >> 2) * 4 + (w & 3)] = word;
      if ((u & (L - 1)) == 0) xd[u / L] = __half2float(__float2half_rn(m / 127.0f));
    }
  }
}

// The zero point's integer part, once per token: a chunk's dot product splits into dot blocks (q4:
// its 32 elements; q3: each scale block), and xz[g] = kMagic - zero * (the x codes' sum over dot block
// g, its words in chunk order), so that the chunk's f32 sum is float(dp - zero * sum) =
// __int_as_float(dp + xz) - kMagicF (common.cuh: kMagic), exact for |dp - zero * sum| < 2^22. q8_0
// and the grid types have no zero point.
template <int DT>
constexpr bool kZeroPoint = DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_Q3;

template <int DT, int B, int NBL>
__host__ __device__ constexpr int dot_block() { return DT == UPG_DTYPE_Q3 ? B : 32; }  // elements

template <int DT, int B, int NBL>
__device__ void zero_sums(const uint32_t* xq, int32_t* xz, int cols) {
  if constexpr (kZeroPoint<DT>) {
    constexpr int W = dot_block<DT, B, NBL>() / 4, Z = DT == UPG_DTYPE_Q4 ? UPG_Q4_ZERO : UPG_Q3_ZERO;
    for (int g = threadIdx.x; g < cols / (4 * W); g += blockDim.x) {
      int sum = 0;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int w = g * W + j;
        sum = __dp4a(int(xq[xq_group<DT, B, NBL>(w >> 2) * 4 + (w & 3)]), 0x01010101, sum);
      }
      xz[g] = kMagic - Z * sum;
    }
  }
}

__device__ __forceinline__ float exact_float(int dp, int xz) { return __int_as_float(dp + xz) - kMagicF; }

// The chunk's dot product with its 8-bit x words xw (chunk order), scales applied: integer dot
// products per scale block (dp4a), the zero point removed with the dot blocks' xz (zero_sums). The
// f32 steps are explicit (no contraction), the same in every variant of the kernel.
template <int DT, int B, int NBL>
__device__ __forceinline__ float chunk_dot_q8(const Raw& raw, const uint32_t* xw, const float* xd, const int32_t* xz) {
  constexpr int CE = chunk_elems<DT, B, NBL>();
  const int w[4] = {int(raw.q.x), int(raw.q.y), int(raw.q.z), int(raw.q.w)};
  const int* x = reinterpret_cast<const int*>(xw);
  if constexpr (DT == UPG_DTYPE_Q8_0) {
    int dp = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) dp = __dp4a(w[i], x[i], dp);
    return __fmul_rn(__fmul_rn(raw.d[0], xd[0]), exact_float(dp, kMagic));
  }
  // iq4_nl, iq4_xs: the block sum starts at kMagic, so that exact_float takes it as it stands
  // (|sum| <= 32 * 127 * 127 < 2^22).
  if constexpr (kGrid4<DT>) {  // nibbles 4h..4h+3 of word i: elements 4i + 2h + {0, 16, 1, 17} = x word 2i + h
    int dp = kMagic, dn = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t pos, neg;
        grid4_split(uint32_t(w[i]) >> (16 * h), pos, neg);
        dp = __dp4a(int(pos), x[2 * i + h], dp);
        dn = __dp4a(int(neg), x[2 * i + h], dn);
      }
    return __fmul_rn(__fmul_rn(raw.d[0], xd[0]), exact_float(dp, -dn));
  }
  if constexpr (DT == UPG_DTYPE_IQ3) {
    // Word i of ql holds elements 4i..4i+3 of the group's 4 blocks (block p at bits 2p of each
    // byte), qh word i % 4 their high bits (block p's at bit 2p + i / 4). Blocks p and p + 2 go
    // into one word of 3-bit selectors, low and high nibble of each byte, looked up together and
    // then parted. The block sums start at kMagic.
    const uint32_t q[8] = {raw.q.x, raw.q.y, raw.q.z, raw.q.w, raw.q2.x, raw.q2.y, raw.q2.z, raw.q2.w};
    const uint32_t h[4] = {raw.h.x, raw.h.y, raw.h.z, raw.h.w};
    int dp[4] = {kMagic, kMagic, kMagic, kMagic};
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const uint32_t sel = ((q[i] >> (2 * p)) & 0x33333333u) | (shift_left(h[i & 3], 2 - 2 * p - (i >> 2)) & 0x44444444u);
        const uint32_t a = prmt(kGrid3W0, kGrid3W1, sel), b = prmt(kGrid3W0, kGrid3W1, sel >> 16);  // nibbles < 8
        dp[p] = __dp4a(int(prmt(a, b, 0x6420)), x[8 * p + i], dp[p]);
        dp[p + 2] = __dp4a(int(prmt(a, b, 0x7531)), x[8 * (p + 2) + i], dp[p + 2]);
      }
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < 4; ++p) s = __fadd_rn(s, __fmul_rn(__fmul_rn(raw.d[p], xd[p]), exact_float(dp[p], 0)));
    return s;
  }
  if constexpr (DT == UPG_DTYPE_Q4) {  // word i: low nibbles -> x word i, high nibbles -> x word 4 + i
    int dp = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      dp = __dp4a(w[i] & 0x0f0f0f0f, x[i], dp);
      dp = __dp4a((w[i] >> 4) & 0x0f0f0f0f, x[4 + i], dp);
    }
    return __fmul_rn(__fmul_rn(raw.d[0], xd[0]), exact_float(dp, xz[0]));
  }
  const uint32_t h[2] = {raw.h.x, raw.h.y};
  if constexpr (B == 32) {  // the word layout of chunk_dot's q3 comment
    float s = 0.0f;
#pragma unroll
    for (int bl = 0; bl < NBL; ++bl) {
      int dp = 0;
#pragma unroll
      for (int wl = 0; wl < 2; ++wl)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int j = 8 * bl + 2 * k + wl;
          dp = __dp4a(int(q3_codes(w[2 * bl + wl], h[bl], k, 2 * k + wl)), x[j], dp);
        }
      s = __fadd_rn(s, __fmul_rn(__fmul_rn(raw.d[bl], xd[bl]), exact_float(dp, xz[bl])));
    }
    return s;
  }
  int dp = 0;
#pragma unroll
  for (int wq = 0; wq < 4; ++wq)
#pragma unroll
    for (int k = 0; k < 4; ++k) dp = __dp4a(int(q3_codes(w[wq], h[wq % 2], k, 2 * k + wq / 2)), x[4 * k + wq], dp);
  static_assert(CE == 64 || DT != UPG_DTYPE_Q3 || B == 32, "q3 block 64: one block per chunk");
  return __fmul_rn(__fmul_rn(raw.d[0], xd[0]), exact_float(dp, xz[0]));
}

// A dense chunk's dot product with its f32 x units xv (local order of x_unit).
template <int DT>
__device__ __forceinline__ float chunk_dot_f32(const Raw& raw, const float4* xv) {
  const uint32_t w[4] = {raw.q.x, raw.q.y, raw.q.z, raw.q.w};
  if constexpr (DT == UPG_DTYPE_F32) return dot4(*reinterpret_cast<const float4*>(&raw.q), xv[0]);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (DT == UPG_DTYPE_F16) f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
    else f = make_float2(__uint_as_float(w[i] << 16), __uint_as_float(w[i] & 0xffff0000u));
    const float4 x = xv[i / 2];
    s += (i & 1) ? f.x * x.z + f.y * x.w : f.x * x.x + f.y * x.y;
  }
  return s;
}

constexpr int kPrefetchBytes = 4096;  // per row, before the dependency wait

template <int DT>
__device__ __forceinline__ int64_t row_code_bytes(int cols) {
  return DT == UPG_DTYPE_F32 ? 4 * int64_t(cols) : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 2 * int64_t(cols)
       : DT == UPG_DTYPE_Q8_0 ? cols : (DT == UPG_DTYPE_Q4 || kGrid4<DT>) ? cols / 2 : cols / 4;
}

struct FuseDev {
  const float* norm_weight;
  float eps;
  int silu_mul;
  int accumulate;
};

// x (or its fused prologue) into swizzled shared memory, all threads of the block. The rms_norm
// fusion stores x, sums its squares, then scales it by the norm weight and the inverse norm, as the
// rms_norm kernel does (common.cuh: the same bits as the unfused ops). Each thread issues up to
// kNormUnits independent 16-byte loads before their first use: the staging costs one or two L2
// round trips instead of one per element.
template <int S>
__device__ void stage_x(float* xs, const float* __restrict__ x, int n, const FuseDev& f) {
  constexpr int U = kNormUnits;
  __shared__ double red[kNormThreads / 32];
  double ss = 0.0;
  const bool norm = f.norm_weight != nullptr;
  const bool vec = (n & 3) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(f.norm_weight) & 15) == 0;
  const int units = n >> 2;
  float4* xs4 = reinterpret_cast<float4*>(xs);
  if (vec) {
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int u0 = threadIdx.x; u0 < units; u0 += blockDim.x * U) {
      float4 v[U], g[U];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * int(blockDim.x);
        if (u < units) {
          v[i] = x4[u];
          if (f.silu_mul) g[i] = x4[units + u];
        }
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * int(blockDim.x);
        if (u >= units) continue;
        float4 a = v[i];
        if (f.silu_mul)
          a = make_float4(silu_mul1(a.x, g[i].x), silu_mul1(a.y, g[i].y), silu_mul1(a.z, g[i].z), silu_mul1(a.w, g[i].w));
        if (norm) ss = add_squares(ss, a);
        xs4[swz<S>(u)] = a;
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = f.silu_mul ? silu_mul1(x[i], x[n + i]) : x[i];
      if (norm) ss = add_squares(ss, v);
      xs[swz_float<S>(i)] = v;
    }
  }
  if (!norm) return;
  const float inv = rms_inverse(ss, n, f.eps, red);  // after its barrier, each thread rescales what it stored
  if (vec) {
    const float4* w4 = reinterpret_cast<const float4*>(f.norm_weight);
    for (int u0 = threadIdx.x; u0 < units; u0 += blockDim.x * U) {
      float4 w[U];
#pragma unroll
      for (int i = 0; i < U; ++i)
        if (u0 + i * int(blockDim.x) < units) w[i] = w4[u0 + i * int(blockDim.x)];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * int(blockDim.x);
        if (u < units) xs4[swz<S>(u)] = rms_scale(xs4[swz<S>(u)], w[i], inv);
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) xs[swz_float<S>(i)] = rms_scale(xs[swz_float<S>(i)], f.norm_weight[i], inv);
  }
}

// Bytes of x as f32 in shared memory: whole 16-byte units, 8 at a time.
__host__ __device__ inline int xs_bytes(int cols) { return ((cols + 3) / 4 + 7) / 8 * 8 * 16; }

template <int DT>
constexpr bool kQuantized = DT == UPG_DTYPE_Q8_0 || DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_Q3 || kGridType<DT>;

// Bytes of one token's 8-bit x in shared memory: the codes xq [cols], the scales xd [cols / block]
// and the zero sums xz [cols / 32] (zero_sums; at most one per 32 elements), 16-byte aligned.
__host__ __device__ inline int xq_bytes(int cols, int block) { return (cols + (cols / block) * 4 + (cols / 32) * 4 + 15) / 16 * 16; }

// Shared memory of one launch: the one-token kernel stages x as f32 (and its prologue) before it
// rounds it; several tokens keep only their 8-bit x (rounded straight from global memory), or for
// dense weights their f32 x.
inline size_t matvec_smem(bool quantized, int cols, int block, int n) {
  if (n == 1) return size_t(xs_bytes(cols)) + (quantized ? size_t(xq_bytes(cols, block)) : 0);
  return size_t(n) * (quantized ? xq_bytes(cols, block) : xs_bytes(cols));
}

constexpr int kMvTokens = 16;  // tokens a launch at most

// Rows a warp owns at a time: the accumulators of R rows x NT tokens stay in registers, beside the
// rows' chunks (iq3's: 64 bytes a row, so 2 rows for several tokens, 1 at 16).
__host__ __device__ constexpr int mv_rows(int dtype, int nt) {
  return nt == 1 ? kMvRows : dtype == UPG_DTYPE_IQ3 ? (nt >= 16 ? 1 : 2) : nt >= 16 ? 2 : kMvRows;
}

// The one-token kernel's rows a warp: kMvRows, or 3 where that gives the busiest warp fewer rows
// (each of the grid's warps takes ceil(groups / warps) groups of R rows: Phi-4's 5120 rows over 132
// x 16 warps are 1280 groups of 4, leaving 832 warps idle, or 1707 groups of 3). A row's sums do not
// depend on R (its lanes, chunks and order are the same), so matvec_n keeps the bits either way.
int one_token_rows(int rows, int warps) {
  auto busiest = [&](int r) { return ((rows + r - 1) / r + warps - 1) / warps * r; };
  return busiest(3) < busiest(kMvRows) ? 3 : kMvRows;
}

// NT: tokens the launch is built for, n <= NT of them at run time (x rows cols floats apart, y rows
// ldy apart); NT = 1 is the one-token kernel, with the optional fusions. R: rows a warp.
template <int DT, int B, int NBL, bool VEC, int NT, int R = mv_rows(DT, NT)>
__global__ void __launch_bounds__(kMvWarps * 32) k_matvec(MatView m, const float* __restrict__ x,
                                                         float* __restrict__ y, FuseDev f, int n, int ldy) {
  constexpr int CE = chunk_elems<DT, B, NBL>(), S = swizzle_shift<DT, B, NBL>();
  extern __shared__ float4 xs4[];
  uint8_t* sm = reinterpret_cast<uint8_t*>(xs4);
  // The tokens present: NT for one token is a constant, so nothing below branches on n (a branch
  // would sink the chunk loads into it and stop the unrolled chunks' loads overlapping); a
  // quantized type's block is B (pick), so the offsets below need no run-time division.
  if constexpr (NT == 1) n = 1;
  constexpr int kBlock = kQuantized<DT> ? B : 1;
  const int xsb = xs_bytes(m.cols), xqb = xq_bytes(m.cols, kBlock);
  // token t's f32 x (the one-token kernel, dense weights) and 8-bit x
  auto xs_of = [&](int t) { return reinterpret_cast<float*>(sm + (NT == 1 ? 0 : t * xsb)); };
  auto xq_of = [&](int t) { return reinterpret_cast<uint32_t*>(sm + (NT == 1 ? xsb : t * xqb)); };
  auto xd_of = [&](int t) { return reinterpret_cast<float*>(reinterpret_cast<uint8_t*>(xq_of(t)) + m.cols); };
  auto xz_of = [&](int t) { return reinterpret_cast<int32_t*>(xd_of(t) + m.cols / kBlock); };
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int groups = (m.rows + R - 1) / R, nc = m.cols / CE;
  pdl_trigger();
  // The weights never change: pull the start of this warp's first rows into L2 while the
  // previous kernel drains, then wait for it before reading x.
  if (const int g0 = blockIdx.x + gridDim.x * warp; g0 < groups) {
    const int64_t rb = row_code_bytes<DT>(m.cols), span = rb < kPrefetchBytes ? rb : kPrefetchBytes;
#pragma unroll
    for (int i = 0; i < R; ++i)
      if (g0 * R + i < m.rows)
        for (int64_t off = lane * 128; off < span; off += 32 * 128)
          asm volatile("prefetch.global.L2 [%0];" ::"l"(m.codes + (int64_t(g0) * R + i) * rb + off));
  }
  pdl_wait();
  if constexpr (NT == 1) {
    stage_x<S>(xs_of(0), x, m.cols, f);
    __syncthreads();
    if constexpr (kQuantized<DT>) {
      const float4* s4 = reinterpret_cast<const float4*>(xs_of(0));
      quantize_x<DT, B, NBL>([&](int u) { return s4[swz<S>(u)]; }, xq_of(0), xd_of(0), m.cols);
    }
  } else if constexpr (kQuantized<DT>) {  // the values the one-token kernel stages: x itself (no fusions)
    for (int t = 0; t < n; ++t) {
      const float4* x4 = reinterpret_cast<const float4*>(x + int64_t(t) * m.cols);
      quantize_x<DT, B, NBL>([&](int u) { return x4[u]; }, xq_of(t), xd_of(t), m.cols);
    }
  } else {
    for (int t = 0; t < n; ++t) stage_x<S>(xs_of(t), x + int64_t(t) * m.cols, m.cols, f);
  }
  if constexpr (kQuantized<DT>) {
    __syncthreads();
    for (int t = 0; t < n; ++t) zero_sums<DT, B, NBL>(xq_of(t), xz_of(t), m.cols);
  }
  __syncthreads();
  // x[t][k] as the one-token kernel reads it for the outliers (its staged f32 x)
  auto x_at = [&](int t, int k) {
    if constexpr (NT > 1 && kQuantized<DT>) return x[int64_t(t) * m.cols + k];
    else return xs_of(t)[swz_float<S>(k)];
  };

  for (int g = blockIdx.x + gridDim.x * warp; g < groups; g += gridDim.x * kMvWarps) {
    const int r0 = g * R;
    float acc[R][NT];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int t = 0; t < NT; ++t) acc[i][t] = 0.0f;
    if constexpr (VEC) {
      // several tokens: the next chunk's loads are issued before this chunk's products (the
      // one-token kernel gets that from unrolling by 2); not q3, whose chunks need more registers
      // than the pipeline leaves (spills), nor the grid types below 16 tokens (ptxas reports spills
      // there; at 16 their fewer rows a warp leave room)
      constexpr bool kPipe = NT > 1 && DT != UPG_DTYPE_Q3 && (!kGridType<DT> || NT >= 16);
      [[maybe_unused]] Raw next[R];
      if constexpr (kPipe)
#pragma unroll
        for (int i = 0; i < R; ++i) next[i] = load_chunk<DT, B, NBL>(m, min(r0 + i, m.rows - 1), min(lane, nc - 1));
#pragma unroll(CE >= 64 || NT > 1 ? 1 : 2)
      for (int c = lane; c < nc; c += 32) {
        Raw raw[R];
#pragma unroll
        for (int i = 0; i < R; ++i) {
          if constexpr (kPipe) {
            raw[i] = next[i];
            next[i] = load_chunk<DT, B, NBL>(m, min(r0 + i, m.rows - 1), min(c + 32, nc - 1));
          } else {
            raw[i] = load_chunk<DT, B, NBL>(m, min(r0 + i, m.rows - 1), c);
          }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (t >= n) break;  // uniform
          if constexpr (kQuantized<DT>) {
            constexpr int G = chunk_groups<DT, B, NBL>(), DB = CE / dot_block<DT, B, NBL>();
            const uint32_t* xq = xq_of(t);
            uint32_t xw[CE / 4];
#pragma unroll
            for (int j = 0; j < G; ++j) {
              const uint4 v = reinterpret_cast<const uint4*>(xq)[xq_group<DT, B, NBL>(c * G + j)];
              xw[4 * j] = v.x, xw[4 * j + 1] = v.y, xw[4 * j + 2] = v.z, xw[4 * j + 3] = v.w;
            }
            const float* xd = xd_of(t);
            const int b0 = DT == UPG_DTYPE_Q3 ? c * NBL : (c * CE) / B;  // the chunk's first activation block
            constexpr int XB = DT == UPG_DTYPE_IQ3 ? 4 : NBL;            // activation blocks in the chunk
            float xdc[XB];
#pragma unroll
            for (int j = 0; j < XB; ++j) xdc[j] = xd[b0 + j];
            int32_t xzc[2] = {kMagic, kMagic};
            if constexpr (kZeroPoint<DT>) {
              const int32_t* xz = xz_of(t);
              xzc[0] = xz[c * DB];
              if constexpr (DB == 2) xzc[1] = xz[c * DB + 1];
            }
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i][t] = __fadd_rn(acc[i][t], chunk_dot_q8<DT, B, NBL>(raw[i], xw, xdc, xzc));
          } else {
            const float4* s4 = reinterpret_cast<const float4*>(xs_of(t));
            float4 xv[CE / 4];
#pragma unroll
            for (int u = 0; u < CE / 4; ++u) xv[u] = s4[swz<S>(x_unit<DT, B, NBL>(c, u))];
#pragma unroll
            for (int i = 0; i < R; ++i) acc[i][t] += chunk_dot_f32<DT>(raw[i], xv);
          }
        }
      }
    } else {
      for (int k = lane; k < m.cols; k += 32) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const float e = elem<DT, B>(m, min(r0 + i, m.rows - 1), k);
#pragma unroll
          for (int t = 0; t < NT; ++t)
            if (t < n) acc[i][t] += e * xs_of(t)[swz_float<S>(k)];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = r0 + i;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (t >= n) break;
        if (m.rowptr != nullptr && r < m.rows)
          for (int o = m.rowptr[r] + lane; o < m.rowptr[r + 1]; o += 32)
            acc[i][t] = __fmaf_rn(f16(m.val[o]), x_at(t, m.col[o]), acc[i][t]);
        const float s = warp_sum(acc[i][t]);
        float* yt = y + int64_t(t) * ldy;
        if (lane == 0 && r < m.rows) yt[r] = f.accumulate ? yt[r] + s : s;
      }
    }
  }
}

using MatvecKernel = void (*)(MatView, const float*, float*, FuseDev, int, int);

// The variants of one type: one token (kMvRows and 3 rows a warp), 4, 8 and 16 tokens.
struct MatvecVariants {
  MatvecKernel k[5];
};

template <int DT, int B, int NBL, bool VEC>
MatvecVariants variant() {
  return {{k_matvec<DT, B, NBL, VEC, 1>, k_matvec<DT, B, NBL, VEC, 1, 3>, k_matvec<DT, B, NBL, VEC, 4>,
           k_matvec<DT, B, NBL, VEC, 8>, k_matvec<DT, B, NBL, VEC, 16>}};
}

MatvecVariants pick(const Weight& w) {
  const int cols = w.args.cols, B = w.args.block;
  const bool aligned = (reinterpret_cast<uintptr_t>(w.data) & 15) == 0;
  switch (w.dtype) {
    case UPG_DTYPE_F32:
      return cols % 4 == 0 && aligned ? variant<UPG_DTYPE_F32, 0, 1, true>() : variant<UPG_DTYPE_F32, 0, 1, false>();
    case UPG_DTYPE_F16:
      return cols % 8 == 0 && aligned ? variant<UPG_DTYPE_F16, 0, 1, true>() : variant<UPG_DTYPE_F16, 0, 1, false>();
    case UPG_DTYPE_BF16:
      return cols % 8 == 0 && aligned ? variant<UPG_DTYPE_BF16, 0, 1, true>() : variant<UPG_DTYPE_BF16, 0, 1, false>();
  }
  if (!aligned) throw std::invalid_argument("cuda matvec: quantized weights must be 16-byte aligned");
  if (w.dtype == UPG_DTYPE_Q8_0) return B == 32 ? variant<UPG_DTYPE_Q8_0, 32, 1, true>() : variant<UPG_DTYPE_Q8_0, 64, 1, true>();
  if (w.dtype == UPG_DTYPE_Q4) return B == 32 ? variant<UPG_DTYPE_Q4, 32, 1, true>() : variant<UPG_DTYPE_Q4, 64, 1, true>();
  if (w.dtype == UPG_DTYPE_IQ4_NL) return variant<UPG_DTYPE_IQ4_NL, 32, 1, true>();  // block 32 (check_weight)
  if (w.dtype == UPG_DTYPE_IQ4_XS) return variant<UPG_DTYPE_IQ4_XS, 32, 1, true>();
  if (w.dtype == UPG_DTYPE_IQ3) return variant<UPG_DTYPE_IQ3, 32, 1, true>();
  if (B == 64) return variant<UPG_DTYPE_Q3, 64, 1, true>();
  return (cols / 32) % 2 == 0 ? variant<UPG_DTYPE_Q3, 32, 2, true>() : variant<UPG_DTYPE_Q3, 32, 1, true>();
}

// Every instantiation, for init's shared-memory attribute.
const MatvecVariants kAll[] = {
    variant<UPG_DTYPE_F32, 0, 1, true>(),   variant<UPG_DTYPE_F32, 0, 1, false>(),
    variant<UPG_DTYPE_F16, 0, 1, true>(),   variant<UPG_DTYPE_F16, 0, 1, false>(),
    variant<UPG_DTYPE_BF16, 0, 1, true>(),  variant<UPG_DTYPE_BF16, 0, 1, false>(),
    variant<UPG_DTYPE_Q8_0, 32, 1, true>(), variant<UPG_DTYPE_Q8_0, 64, 1, true>(),
    variant<UPG_DTYPE_Q4, 32, 1, true>(),   variant<UPG_DTYPE_Q4, 64, 1, true>(),
    variant<UPG_DTYPE_Q3, 32, 1, true>(),   variant<UPG_DTYPE_Q3, 32, 2, true>(),
    variant<UPG_DTYPE_Q3, 64, 1, true>(),   variant<UPG_DTYPE_IQ4_NL, 32, 1, true>(),
    variant<UPG_DTYPE_IQ4_XS, 32, 1, true>(), variant<UPG_DTYPE_IQ3, 32, 1, true>(),
};

// One launch of n tokens (n == 1: the one-token kernel) over the variant for the next size up.
void launch_matvec(const Weight& w, const MatvecVariants& v, const float* x, float* y, int n, int ldy,
                   const FuseDev& f, size_t smem, cudaStream_t s) {
  const int nt = n == 1 ? 1 : n <= 4 ? 4 : n <= 8 ? 8 : 16;  // the variant's NT
  MatvecKernel kernel = v.k[nt == 1 ? 0 : nt == 4 ? 2 : nt == 8 ? 3 : 4];
  int rows_per_warp = mv_rows(w.dtype, nt);
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMvWarps * 32, smem), "matvec occupancy");
  if (nt == 1 && one_token_rows(w.args.rows, sm_count() * std::max(per_sm, 1) * kMvWarps) == 3) {
    kernel = v.k[1];
    rows_per_warp = 3;
    check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMvWarps * 32, smem), "matvec occupancy");
  }
  const int groups = (w.args.rows + rows_per_warp - 1) / rows_per_warp;
  const int grid = std::max(1, std::min(groups, sm_count() * std::max(per_sm, 1)));
  launch("matvec", kernel, grid, kMvWarps * 32, smem, s, view(w), x, y, f, n, ldy);
}

}  // namespace

void init_matvec() {
  for (const MatvecVariants& v : kAll)
    for (MatvecKernel k : v.k) allow_max_smem(reinterpret_cast<const void*>(k));
}

void matvec(const Weight& w, const float* x, float* y, cudaStream_t s, const MatvecFuse& fuse) {
  check_weight(w, "matvec");
  const MatvecVariants v = pick(w);
  const bool q8 = is_quantized(DType(w.dtype));  // x rounded to 8 bits for every quantized type
  const size_t smem = matvec_smem(q8, w.args.cols, w.args.block, 1);
  // x, plus stage_x's static reduction scratch, must fit in one block's shared memory.
  if (smem + 32 * sizeof(float) > size_t(max_smem_optin()))
    throw std::invalid_argument("cuda matvec: cols too large for shared memory");
  const FuseDev f{fuse.norm_weight, fuse.eps, fuse.silu_mul ? 1 : 0, fuse.accumulate ? 1 : 0};
  launch_matvec(w, v, x, y, 1, w.args.rows, f, smem, s);
}

int matvec_tokens(const Weight& w) {
  const bool q8 = is_quantized(DType(w.dtype));
  const size_t per = matvec_smem(q8, w.args.cols, w.args.block, 2) / 2, room = size_t(max_smem_optin()) - 32 * sizeof(float);
  return int(std::max<size_t>(1, std::min<size_t>(kMvTokens, room / per)));
}

void matvec_n(const Weight& w, const float* x, float* y, int n, cudaStream_t s) {
  check_weight(w, "matvec_n");
  if (n < 1) throw std::invalid_argument("cuda matvec_n: no tokens");
  const MatvecVariants v = pick(w);
  const bool q8 = is_quantized(DType(w.dtype));
  if (q8 && (reinterpret_cast<uintptr_t>(x) & 15) != 0)
    throw std::invalid_argument("cuda matvec_n: x must be 16-byte aligned for quantized weights");
  if (matvec_smem(q8, w.args.cols, w.args.block, 1) + 32 * sizeof(float) > size_t(max_smem_optin()))
    throw std::invalid_argument("cuda matvec_n: cols too large for shared memory");
  const int per_launch = matvec_tokens(w), ldy = w.args.ldy;
  const FuseDev f{nullptr, 0.0f, 0, 0};
  for (int t0 = 0; t0 < n; t0 += per_launch) {
    const int k = std::min(per_launch, n - t0);
    launch_matvec(w, v, x + int64_t(t0) * w.args.cols, y + int64_t(t0) * ldy, k, ldy, f,
                  matvec_smem(q8, w.args.cols, w.args.block, k), s);
  }
}

}  // namespace upg::cuda
