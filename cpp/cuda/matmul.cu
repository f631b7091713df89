// Prefill mat-mul on the tensor cores: y[t * ldy + r] = sum_k W[r][k] x[t][k] (+ outliers) for the
// pass's tokens. A block computes a 64-token x 128-row tile of y with 8 warps of 32 x 32. Quantized
// weights (k_matmul_q8): their int8 codes times x rounded to 8 bits per block, as the mat-vec and
// the CPU round it, on mma.m16n8k32 s8. Dense weights (k_matmul): W and x rounded to f16 in shared
// memory per 64-wide k step, four 16x16x16 WMMA fragments per warp, f32 accumulation. Ragged rows,
// tokens and k are zero-filled on load and skipped on store; the outliers are added in the
// epilogue from the f32 activations.
#include <mma.h>

#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;
using namespace nvcuda;

constexpr int kTm = 128, kTn = 64, kTk = 64, kThreads = 256;
constexpr int kLd = kTk + 8;    // halves per smem row (16-byte multiple, staggers the banks)
constexpr int kCld = kTm + 4;   // floats per row of the output tile
constexpr size_t kSmemTiles = size_t(kTm + kTn) * kLd * 2;
constexpr size_t kSmemOut = size_t(kTn) * kCld * 4;
constexpr size_t kSmem = kSmemTiles > kSmemOut ? kSmemTiles : kSmemOut;

// The block's output tile, cs [kTn tokens][kCld] (rows contiguous), plus the rows' outliers times the
// f32 activations, into y: consecutive threads write consecutive rows of one token.
__device__ __forceinline__ void store_tile(const MatView& m, const float* __restrict__ x, float* __restrict__ y,
                                           int ldy, const float* cs, int r0, int t0, int n) {
  for (int e = threadIdx.x; e < kTn * kTm; e += kThreads) {
    const int t = t0 + e / kTm, r = r0 + e % kTm;
    if (t >= n || r >= m.rows) continue;
    float v = cs[(e / kTm) * kCld + e % kTm];
    if (m.rowptr != nullptr)
      for (int o = m.rowptr[r]; o < m.rowptr[r + 1]; ++o) v += f16(m.val[o]) * x[int64_t(t) * m.cols + m.col[o]];
    y[int64_t(t) * ldy + r] = v;
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) k_matmul(MatView m, const float* __restrict__ x, float* __restrict__ y,
                                                    int ldy, const int32_t* __restrict__ pass) {
  pdl_enter();
  const int n = n_tokens(pass);
  const int r0 = blockIdx.x * kTm, t0 = blockIdx.y * kTn;
  if (t0 >= n) return;
  extern __shared__ __align__(16) uint8_t smem[];
  __half* ws = reinterpret_cast<__half*>(smem);  // [kTm][kLd]
  __half* xs = ws + kTm * kLd;                   // [kTn][kLd]
  float* cs = reinterpret_cast<float*>(smem);    // [kTn][kCld], after the main loop
  const int tid = threadIdx.x, warp = tid >> 5, wr = warp & 3, wt = warp >> 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int k0 = 0; k0 < m.cols; k0 += kTk) {
#pragma unroll 8
    for (int j = 0; j < kTm * kTk / kThreads; ++j) {
      const int e = tid + kThreads * j, r = r0 + e / kTk, k = k0 + e % kTk;
      ws[(e / kTk) * kLd + e % kTk] = __float2half_rn(r < m.rows && k < m.cols ? elem<DT, 0>(m, r, k) : 0.0f);
    }
#pragma unroll 8
    for (int j = 0; j < kTn * kTk / kThreads; ++j) {
      const int e = tid + kThreads * j, t = t0 + e / kTk, k = k0 + e % kTk;
      xs[(e / kTk) * kLd + e % kTk] = __float2half_rn(t < n && k < m.cols ? x[int64_t(t) * m.cols + k] : 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTk; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], xs + (wt * 32 + i * 16) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], ws + (wr * 32 + j * 16) * kLd + kk, kLd);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wt * 32 + i * 16) * kCld + wr * 32 + j * 16, acc[i][j], kCld, wmma::mem_row_major);
  __syncthreads();
  store_tile(m, x, y, ldy, cs, r0, t0, n);
}

// ---- 8-bit tensor-core mat-mul for the quantized types ----
// The weights' integer codes (zero point removed) times x rounded to 8 bits per weight block
// exactly as the decode mat-vec and the CPU round it (d = f16(amax / 127), q = rint(x * 127 /
// amax)): per block of B along k, B / 32 mma.m16n8k32 (s8 x s8 -> s32), then the block's integer
// sums scaled by d_w * d_x into the f32 accumulators. The same 128-row x 64-token tile and 8 warps
// of 32 x 32 as the f16 kernel; a k step is one block: its codes decoded to int8 and its x slice
// rounded in shared memory, while the next block's raw codes and x wait in registers.
template <int B>
constexpr int kQld = B + 16;  // bytes per shared row: fragment loads of 8 rows x 4 words hit 32 banks

template <int DT, int B>
struct Q8Step {
  uint4 q[2];      // this thread's codes of the block (q3: the row's whole ql)
  uint2 h;         // q3: the row's whole qh
  float d;         // the block's weight scale
  float4 x[B / 16];  // this thread's B / 4 floats of x
};

template <int DT, int B>
__device__ __forceinline__ void q8_load(const MatView& m, const float* __restrict__ x, int r0, int t0, int n, int kb,
                                        Q8Step<DT, B>& st) {
  const int tid = threadIdx.x, rr = tid >> 1, half = tid & 1, r = r0 + rr;
  st.d = 0.0f;
  if (r < m.rows) {
    const int64_t e = int64_t(r) * m.cols + int64_t(kb) * B;  // first element of the row's block
    st.d = f16(m.scales[int64_t(r) * (m.cols / B) + kb]);
    if constexpr (DT == UPG_DTYPE_Q8_0) {
      const uint4* p = reinterpret_cast<const uint4*>(m.codes + e + half * (B / 2));
      st.q[0] = __ldg(p);
      if constexpr (B == 64) st.q[1] = __ldg(p + 1);
    } else if constexpr (DT == UPG_DTYPE_Q4) {
      if constexpr (B == 32) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(m.codes + e / 2 + 8 * half));
        st.q[0] = make_uint4(v.x, v.y, 0, 0);
      } else {
        st.q[0] = __ldg(reinterpret_cast<const uint4*>(m.codes + e / 2 + 16 * half));
      }
    } else if constexpr (B == 32) {
      const uint2 v = __ldg(reinterpret_cast<const uint2*>(m.codes + e / 4));
      st.q[0] = make_uint4(v.x, v.y, 0, 0);
      st.h = make_uint2(__ldg(reinterpret_cast<const unsigned int*>(m.high + e / 8)), 0);
    } else {
      st.q[0] = __ldg(reinterpret_cast<const uint4*>(m.codes + e / 4));
      st.h = __ldg(reinterpret_cast<const uint2*>(m.high + e / 8));
    }
  } else {  // a row past the matrix: zero codes (its scale is 0 too)
    st.q[0] = st.q[1] = make_uint4(0, 0, 0, 0);
    st.h = make_uint2(0, 0);
  }
  const int tt = tid >> 2, qq = tid & 3, t = t0 + tt;
#pragma unroll
  for (int i = 0; i < B / 16; ++i)
    st.x[i] = t < n ? __ldg(reinterpret_cast<const float4*>(x + int64_t(t) * m.cols + int64_t(kb) * B + qq * (B / 4)) + i)
                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

__device__ __forceinline__ uint32_t pack4(int a, int b, int c, int d) {
  return (uint32_t(a) & 0xffu) | (uint32_t(b) & 0xffu) << 8 | (uint32_t(c) & 0xffu) << 16 | uint32_t(d) << 24;
}

// The step's codes as int8 (zero point removed) into ws [kTm][kQld], its x rounded into xs
// [kTn][kQld], the scales into wd [kTm] and xd [kTn].
template <int DT, int B>
__device__ __forceinline__ void q8_store(const Q8Step<DT, B>& st, int8_t* ws, int8_t* xs, float* wd, float* xd) {
  const int tid = threadIdx.x, rr = tid >> 1, half = tid & 1;
  uint32_t* row = reinterpret_cast<uint32_t*>(ws + rr * kQld<B>);
  const uint32_t* q = reinterpret_cast<const uint32_t*>(st.q);
  if constexpr (DT == UPG_DTYPE_Q8_0) {
#pragma unroll
    for (int i = 0; i < B / 8; ++i) row[half * (B / 8) + i] = q[i];
  } else if constexpr (DT == UPG_DTYPE_Q4) {
    // bytes i of the half: element i (low nibble) and i + B / 2 (high), i from half * B / 4
#pragma unroll
    for (int i = 0; i < B / 16; ++i) {
      row[half * (B / 16) + i] = __vsub4(q[i] & 0x0f0f0f0fu, 0x08080808u);
      row[B / 8 + half * (B / 16) + i] = __vsub4((q[i] >> 4) & 0x0f0f0f0fu, 0x08080808u);
    }
  } else {  // q3: this half's elements from the whole ql / qh (docs/FORMAT.md)
    const uint8_t* ql = reinterpret_cast<const uint8_t*>(st.q);
    const uint8_t* qh = reinterpret_cast<const uint8_t*>(&st.h);
#pragma unroll
    for (int i = 0; i < B / 8; ++i) {
      int v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int j = half * (B / 2) + 4 * i + u;
        v[u] = (((ql[j % (B / 4)] >> (2 * (j / (B / 4)))) & 3) | (((qh[j % (B / 8)] >> (j / (B / 8))) & 1) << 2)) - UPG_Q3_ZERO;
      }
      row[half * (B / 8) + i] = pack4(v[0], v[1], v[2], v[3]);
    }
  }
  if (half == 0) wd[rr] = st.d;
  // x: the 4 threads of a token hold its B floats; amax over them, then the CPU's rounding.
  const int tt = tid >> 2, qq = tid & 3;
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < B / 16; ++i)
    a = fmaxf(a, fmaxf(fmaxf(fabsf(st.x[i].x), fabsf(st.x[i].y)), fmaxf(fabsf(st.x[i].z), fabsf(st.x[i].w))));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
  const float inv = a != 0.0f ? 127.0f / a : 0.0f;
  uint32_t* xrow = reinterpret_cast<uint32_t*>(xs + tt * kQld<B>) + qq * (B / 16);
#pragma unroll
  for (int i = 0; i < B / 16; ++i)
    xrow[i] = pack4(__float2int_rn(st.x[i].x * inv), __float2int_rn(st.x[i].y * inv), __float2int_rn(st.x[i].z * inv),
                    __float2int_rn(st.x[i].w * inv));
  if (qq == 0) xd[tt] = __half2float(__float2half_rn(a / 127.0f));
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int DT, int B>
__global__ void __launch_bounds__(kThreads) k_matmul_q8(MatView m, const float* __restrict__ x, float* __restrict__ y,
                                                       int ldy, const int32_t* __restrict__ pass) {
  constexpr int LD = kQld<B>;
  pdl_enter();
  const int n = n_tokens(pass);
  const int r0 = blockIdx.x * kTm, t0 = blockIdx.y * kTn;
  if (t0 >= n) return;
  extern __shared__ __align__(16) uint8_t smem[];
  int8_t* ws = reinterpret_cast<int8_t*>(smem);          // [kTm][LD]
  int8_t* xs = ws + kTm * LD;                            // [kTn][LD]
  float* wd = reinterpret_cast<float*>(xs + kTn * LD);   // [kTm]
  float* xd = wd + kTm;                                  // [kTn]
  float* cs = reinterpret_cast<float*>(smem);            // [kTn][kCld], after the main loop
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wr = warp & 3, wt = warp >> 2;
  const int g = lane >> 2, tig = lane & 3;

  float acc[2][4][4] = {};
  Q8Step<DT, B> st;
  q8_load<DT, B>(m, x, r0, t0, n, 0, st);
  const int nb = m.cols / B;
  for (int kb = 0; kb < nb; ++kb) {
    q8_store<DT, B>(st, ws, xs, wd, xd);
    __syncthreads();
    if (kb + 1 < nb) q8_load<DT, B>(m, x, r0, t0, n, kb + 1, st);
    int iacc[2][4][4] = {};
#pragma unroll
    for (int ks = 0; ks < B; ks += 32) {
      uint32_t a[2][4], b[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int8_t* p = ws + (wr * 32 + i * 16 + g) * LD + ks + 4 * tig;
        a[i][0] = *reinterpret_cast<const uint32_t*>(p);
        a[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * LD);
        a[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
        a[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * LD + 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int8_t* p = xs + (wt * 32 + j * 8 + g) * LD + ks + 4 * tig;
        b[j][0] = *reinterpret_cast<const uint32_t*>(p);
        b[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_s8(iacc[i][j], a[i], b[j]);
    }
    // c[0], c[1]: row g, tokens 2 tig, 2 tig + 1; c[2], c[3]: row g + 8
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float d0 = wd[wr * 32 + i * 16 + g], d1 = wd[wr * 32 + i * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float x0 = xd[wt * 32 + j * 8 + 2 * tig], x1 = xd[wt * 32 + j * 8 + 2 * tig + 1];
        acc[i][j][0] += d0 * x0 * float(iacc[i][j][0]);
        acc[i][j][1] += d0 * x1 * float(iacc[i][j][1]);
        acc[i][j][2] += d1 * x0 * float(iacc[i][j][2]);
        acc[i][j][3] += d1 * x1 * float(iacc[i][j][3]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int row = wr * 32 + i * 16 + g, tok = wt * 32 + j * 8 + 2 * tig;
      cs[tok * kCld + row] = acc[i][j][0];
      cs[(tok + 1) * kCld + row] = acc[i][j][1];
      cs[tok * kCld + row + 8] = acc[i][j][2];
      cs[(tok + 1) * kCld + row + 8] = acc[i][j][3];
    }
  __syncthreads();
  store_tile(m, x, y, ldy, cs, r0, t0, n);
}

using MatmulKernel = void (*)(MatView, const float*, float*, int, const int32_t*);

MatmulKernel pick(const Weight& w) {
  const int B = w.args.block;
  switch (w.dtype) {
    case UPG_DTYPE_F32: return k_matmul<UPG_DTYPE_F32>;
    case UPG_DTYPE_F16: return k_matmul<UPG_DTYPE_F16>;
    case UPG_DTYPE_BF16: return k_matmul<UPG_DTYPE_BF16>;
    case UPG_DTYPE_Q8_0: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q8_0, 32> : k_matmul_q8<UPG_DTYPE_Q8_0, 64>;
    case UPG_DTYPE_Q4: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q4, 32> : k_matmul_q8<UPG_DTYPE_Q4, 64>;
    default: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q3, 32> : k_matmul_q8<UPG_DTYPE_Q3, 64>;
  }
}

}  // namespace

void matmul(const Weight& w, const float* x, float* y, const int32_t* pass, cudaStream_t s) {
  check_weight(w, "matmul");
  if (w.args.n_tokens < 1 || w.args.ldy < w.args.rows) throw std::invalid_argument("cuda matmul: bad n_tokens or ldy");
  if (w.dtype != UPG_DTYPE_F32 && w.dtype != UPG_DTYPE_F16 && w.dtype != UPG_DTYPE_BF16 &&
      (reinterpret_cast<uintptr_t>(w.data) & 15) != 0)
    throw std::invalid_argument("cuda matmul: quantized weights must be 16-byte aligned");
  const dim3 grid((w.args.rows + kTm - 1) / kTm, (w.args.n_tokens + kTn - 1) / kTn);
  launch("matmul", pick(w), grid, kThreads, kSmem, s, view(w), x, y, w.args.ldy, pass);
}

}  // namespace upg::cuda
