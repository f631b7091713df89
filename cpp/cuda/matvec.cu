// Decode mat-vec: y[r] = sum_k W[r][k] x[k] (+ the row's outliers, same pass) for every UPG type,
// reading W in the file layout (no repack). x (f32) is staged once per block in shared memory,
// swizzled (common.cuh: swz) so that the lanes' 16-byte reads hit distinct bank groups. Each warp
// owns kMvRows rows at a time; lane l takes the 16-byte code chunks l, l + 32, ... of those rows
// (consecutive lanes, consecutive chunks: one 512-byte coalesced read per row and step), decodes
// them to f32 in registers and multiplies them with the x units it needs. Row groups go round-robin
// over a grid of about (multiprocessors x resident blocks), so every block loads x once.
#include <algorithm>
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kMvWarps = 16;
constexpr int kMvRows = 4;

// Elements per lane chunk: 16 bytes of the codes (q3: NBL blocks of ql, 8 or 16 bytes).
template <int DT, int B, int NBL>
__host__ __device__ constexpr int chunk_elems() {
  return DT == UPG_DTYPE_F32 ? 4 : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 8
       : DT == UPG_DTYPE_Q8_0 ? 16 : DT == UPG_DTYPE_Q4 ? 32 : NBL * B;
}
// Swizzle shift: log2 of the x units one lane reads per chunk (f32: lanes read consecutive units).
template <int DT, int B, int NBL>
__host__ __device__ constexpr int swizzle_shift() {
  return DT == UPG_DTYPE_F32 ? 3 : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 1
       : DT == UPG_DTYPE_Q8_0 ? 2 : DT == UPG_DTYPE_Q4 ? (B == 32 ? 3 : 4) : (NBL * B == 64 ? 4 : 3);
}

struct Raw {
  uint4 q;     // codes (16 bytes; q3 with 32-element chunks: 8 in q.x, q.y)
  uint2 h;     // q3: qh (8 bytes, or 4 in h.x)
  float d0, d1;  // scales of the chunk's blocks (d1: second q3 block)
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
      raw.d0 = f16(m.scales[srow + (c * 16) / B]);
    } else if constexpr (DT == UPG_DTYPE_Q4) {
      raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 2));
      raw.d0 = f16(m.scales[srow + (c * 32) / B]);
    } else if constexpr (CE == 64) {
      raw.q = __ldcs(reinterpret_cast<const uint4*>(m.codes + e / 4));
      raw.h = __ldcs(reinterpret_cast<const uint2*>(m.high + e / 8));
      raw.d0 = f16(m.scales[srow + c * NBL]);
      raw.d1 = NBL == 2 ? f16(m.scales[srow + c * NBL + 1]) : 0.0f;
    } else {
      const uint2 q = __ldcs(reinterpret_cast<const uint2*>(m.codes + e / 4));
      raw.q = make_uint4(q.x, q.y, 0, 0);
      raw.h.x = __ldcs(reinterpret_cast<const unsigned int*>(m.high + e / 8));
      raw.d0 = f16(m.scales[srow + c]);
    }
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

// Codes of a q3 word, each in bits 3..5 of its byte (small_codes_to_float4): field k of the ql
// word plus the high bits of qh at bit hs.
__device__ __forceinline__ uint32_t q3_bytes(uint32_t ql, uint32_t qh, int k, int hs) {
  return (shift_left(ql, 3 - 2 * k) & 0x18181818u) | (shift_left(qh, 5 - hs) & 0x20202020u);
}

// Sums of the chunk's x per scale block (q4, q3: the offset term of small_codes_to_float4).
template <int DT, int B, int NBL>
__device__ __forceinline__ void chunk_xsum(const float4* xv, float* xsum) {
  constexpr int CE = chunk_elems<DT, B, NBL>(), UPB = (CE / 4) / (DT == UPG_DTYPE_Q3 ? NBL : 1);
  if constexpr (DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_Q3) {
#pragma unroll
    for (int bl = 0; bl < (DT == UPG_DTYPE_Q3 ? NBL : 1); ++bl) {
      float s = 0.0f;
#pragma unroll
      for (int u = 0; u < UPB; ++u) s += (xv[bl * UPB + u].x + xv[bl * UPB + u].y) + (xv[bl * UPB + u].z + xv[bl * UPB + u].w);
      xsum[bl] = s;
    }
  }
}

// The chunk's dot product with its x units xv (local order of x_unit), scales applied; xsum from
// chunk_xsum.
template <int DT, int B, int NBL>
__device__ __forceinline__ float chunk_dot(const Raw& raw, const float4* xv, const float* xsum) {
  const uint32_t w[4] = {raw.q.x, raw.q.y, raw.q.z, raw.q.w};
  if constexpr (DT == UPG_DTYPE_F32) return dot4(*reinterpret_cast<const float4*>(&raw.q), xv[0]);
  if constexpr (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) {
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
  if constexpr (DT == UPG_DTYPE_Q8_0) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) s += dot4(bytes_to_float4(w[i] ^ 0x80808080u, kBiasQ8), xv[i]);
    return raw.d0 * s;
  }
  if constexpr (DT == UPG_DTYPE_Q4) {  // word i: low nibbles -> unit i, high nibbles -> unit 4 + i
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      s += dot4(small_codes_to_float4((w[i] << 3) & 0x78787878u), xv[i]);
      s += dot4(small_codes_to_float4((w[i] >> 1) & 0x78787878u), xv[4 + i]);
    }
    return raw.d0 * (32.0f * s - float(16 + UPG_Q4_ZERO) * xsum[0]);
  }
  // q3. B = 32: block bl has ql words 2bl, 2bl+1 and qh word bl; field k of ql word wl holds
  // elements 4wl + i + 8k (unit 8bl + 2k + wl), their high bits at qh bit 2k + wl.
  // B = 64: ql word wq, field k: elements 4wq + i + 16k (unit 4k + wq), high bits in qh word wq % 2
  // at bit 2k + wq / 2.
  if constexpr (B == 32) {
    float s[2] = {0.0f, 0.0f};
    const uint32_t h[2] = {raw.h.x, raw.h.y};
#pragma unroll
    for (int bl = 0; bl < NBL; ++bl)
#pragma unroll
      for (int wl = 0; wl < 2; ++wl)
#pragma unroll
        for (int k = 0; k < 4; ++k)
          s[bl] += dot4(small_codes_to_float4(q3_bytes(w[2 * bl + wl], h[bl], k, 2 * k + wl)), xv[8 * bl + 2 * k + wl]);
    constexpr float kOff = float(16 + UPG_Q3_ZERO);
    return raw.d0 * (32.0f * s[0] - kOff * xsum[0]) + (NBL == 2 ? raw.d1 * (32.0f * s[1] - kOff * xsum[1]) : 0.0f);
  }
  float s = 0.0f;
  const uint32_t h[2] = {raw.h.x, raw.h.y};
#pragma unroll
  for (int wq = 0; wq < 4; ++wq)
#pragma unroll
    for (int k = 0; k < 4; ++k)
      s += dot4(small_codes_to_float4(q3_bytes(w[wq], h[wq % 2], k, 2 * k + wq / 2)), xv[4 * k + wq]);
  return raw.d0 * (32.0f * s - float(16 + UPG_Q3_ZERO) * xsum[0]);
}

constexpr int kPrefetchBytes = 4096;  // per row, before the dependency wait

template <int DT>
__device__ __forceinline__ int64_t row_code_bytes(int cols) {
  return DT == UPG_DTYPE_F32 ? 4 * int64_t(cols) : (DT == UPG_DTYPE_F16 || DT == UPG_DTYPE_BF16) ? 2 * int64_t(cols)
       : DT == UPG_DTYPE_Q8_0 ? cols : DT == UPG_DTYPE_Q4 ? cols / 2 : cols / 4;
}

struct FuseDev {
  const float* norm_weight;
  float eps;
  int silu_mul;
  int accumulate;
};

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// x (or its fused prologue) into swizzled shared memory, all threads of the block. The rms_norm
// fusion stores x * weight and scales by the inverse norm once the block has summed x^2. Each
// thread issues up to 8 independent 16-byte loads before its first store: the staging costs one or
// two L2 round trips instead of one per element.
template <int S>
__device__ void stage_x(float* xs, const float* __restrict__ x, int n, const FuseDev& f) {
  __shared__ float red[32];
  float ss = 0.0f;
  const bool vec = (n & 3) == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(f.norm_weight) & 15) == 0;
  if (vec) {
    constexpr int U = 8;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const float4* w4 = reinterpret_cast<const float4*>(f.norm_weight);
    float4* xs4 = reinterpret_cast<float4*>(xs);
    const int units = n >> 2;
    for (int u0 = threadIdx.x; u0 < units; u0 += blockDim.x * U) {
      float4 v[U], g[U], w[U];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * int(blockDim.x);
        if (u < units) {
          v[i] = x4[u];
          if (f.silu_mul) g[i] = x4[units + u];
          if (w4 != nullptr) w[i] = w4[u];
        }
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * int(blockDim.x);
        if (u >= units) continue;
        float4 a = v[i];
        if (f.silu_mul) a = make_float4(silu(a.x) * g[i].x, silu(a.y) * g[i].y, silu(a.z) * g[i].z, silu(a.w) * g[i].w);
        ss += dot4(a, a);
        if (w4 != nullptr) a = make_float4(a.x * w[i].x, a.y * w[i].y, a.z * w[i].z, a.w * w[i].w);
        xs4[swz<S>(u)] = a;
      }
    }
  } else {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = f.silu_mul ? silu(x[i]) * x[n + i] : x[i];
      ss += v * v;
      xs[swz_float<S>(i)] = f.norm_weight != nullptr ? v * f.norm_weight[i] : v;
    }
  }
  if (f.norm_weight == nullptr) return;
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.0f;
  for (int i = 0; i < int(blockDim.x >> 5); ++i) total += red[i];
  const float inv = rsqrtf(total / float(n) + f.eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) xs[swz_float<S>(i)] *= inv;  // after the barrier
}

template <int DT, int B, int NBL, bool VEC>
__global__ void __launch_bounds__(kMvWarps * 32) k_matvec(MatView m, const float* __restrict__ x,
                                                         float* __restrict__ y, FuseDev f) {
  constexpr int CE = chunk_elems<DT, B, NBL>(), S = swizzle_shift<DT, B, NBL>(), R = kMvRows;
  extern __shared__ float4 xs4[];
  float* xs = reinterpret_cast<float*>(xs4);
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
  stage_x<S>(xs, x, m.cols, f);
  __syncthreads();

  for (int g = blockIdx.x + gridDim.x * warp; g < groups; g += gridDim.x * kMvWarps) {
    const int r0 = g * R;
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; ++i) acc[i] = 0.0f;
    if constexpr (VEC) {
#pragma unroll(CE == 64 ? 1 : 2)
      for (int c = lane; c < nc; c += 32) {
        Raw raw[R];
#pragma unroll
        for (int i = 0; i < R; ++i) raw[i] = load_chunk<DT, B, NBL>(m, min(r0 + i, m.rows - 1), c);
        float4 xv[CE / 4];
#pragma unroll
        for (int u = 0; u < CE / 4; ++u) xv[u] = xs4[swz<S>(x_unit<DT, B, NBL>(c, u))];
        float xsum[2] = {0.0f, 0.0f};
        chunk_xsum<DT, B, NBL>(xv, xsum);
#pragma unroll
        for (int i = 0; i < R; ++i) acc[i] += chunk_dot<DT, B, NBL>(raw[i], xv, xsum);
      }
    } else {
      for (int k = lane; k < m.cols; k += 32) {
        const float xk = xs[swz_float<S>(k)];
#pragma unroll
        for (int i = 0; i < R; ++i) acc[i] += elem<DT, B>(m, min(r0 + i, m.rows - 1), k) * xk;
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int r = r0 + i;
      if (m.rowptr != nullptr && r < m.rows)
        for (int o = m.rowptr[r] + lane; o < m.rowptr[r + 1]; o += 32)
          acc[i] += f16(m.val[o]) * xs[swz_float<S>(m.col[o])];
      const float s = warp_sum(acc[i]);
      if (lane == 0 && r < m.rows) y[r] = f.accumulate ? y[r] + s : s;
    }
  }
}

using MatvecKernel = void (*)(MatView, const float*, float*, FuseDev);

template <int DT, int B, int NBL, bool VEC>
MatvecKernel variant() {
  return k_matvec<DT, B, NBL, VEC>;
}

// Every instantiation, for init's shared-memory attribute.
const MatvecKernel kAll[] = {
    k_matvec<UPG_DTYPE_F32, 0, 1, true>,    k_matvec<UPG_DTYPE_F32, 0, 1, false>,
    k_matvec<UPG_DTYPE_F16, 0, 1, true>,    k_matvec<UPG_DTYPE_F16, 0, 1, false>,
    k_matvec<UPG_DTYPE_BF16, 0, 1, true>,   k_matvec<UPG_DTYPE_BF16, 0, 1, false>,
    k_matvec<UPG_DTYPE_Q8_0, 32, 1, true>,  k_matvec<UPG_DTYPE_Q8_0, 64, 1, true>,
    k_matvec<UPG_DTYPE_Q4, 32, 1, true>,    k_matvec<UPG_DTYPE_Q4, 64, 1, true>,
    k_matvec<UPG_DTYPE_Q3, 32, 1, true>,    k_matvec<UPG_DTYPE_Q3, 32, 2, true>,
    k_matvec<UPG_DTYPE_Q3, 64, 1, true>,
};

MatvecKernel pick(const Weight& w) {
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
  if (B == 64) return variant<UPG_DTYPE_Q3, 64, 1, true>();
  return (cols / 32) % 2 == 0 ? variant<UPG_DTYPE_Q3, 32, 2, true>() : variant<UPG_DTYPE_Q3, 32, 1, true>();
}

}  // namespace

void init_matvec() {
  for (MatvecKernel k : kAll) allow_max_smem(reinterpret_cast<const void*>(k));
}

void matvec(const Weight& w, const float* x, float* y, cudaStream_t s, const MatvecFuse& fuse) {
  check_weight(w, "matvec");
  const MatvecKernel kernel = pick(w);
  const int units = (w.args.cols + 3) / 4;
  const size_t smem = size_t((units + 7) / 8 * 8) * 16;
  // x, plus stage_x's static reduction scratch, must fit in one block's shared memory.
  if (smem + 32 * sizeof(float) > size_t(max_smem_optin()))
    throw std::invalid_argument("cuda matvec: cols too large for shared memory");
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kMvWarps * 32, smem), "matvec occupancy");
  const int groups = (w.args.rows + kMvRows - 1) / kMvRows;
  const int grid = std::max(1, std::min(groups, sm_count() * std::max(per_sm, 1)));
  const FuseDev f{fuse.norm_weight, fuse.eps, fuse.silu_mul ? 1 : 0, fuse.accumulate ? 1 : 0};
  launch("matvec", kernel, grid, kMvWarps * 32, smem, s, view(w), x, y, f);
}

}  // namespace upg::cuda
