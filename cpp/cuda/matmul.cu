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
#include "upg/quant.h"

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
// amax)). k_quantize_x rounds the pass's rows of x once into the scratch (codes and scales); then
// per block of B along k, B / 32 mma.m16n8k32 (s8 x s8 -> s32) and the block's integer sums scaled
// by d_w * d_x into the f32 accumulators. The same 128-row x 64-token tile and 8 warps of 32 x 32
// as the f16 kernel; a k step is 128 of k (128 / B blocks): the weights' codes decoded to int8 and
// the x codes copied into shared memory, while the next step's raw codes wait in registers.
constexpr int kQk = 128;          // k per step
constexpr int kQld = kQk + 16;    // bytes per shared row: fragment loads of 8 rows x 4 words hit 32 banks

// xq [cap][cols] int8 and xd [cap][cols / B] f32 of the pass's rows; one warp per block of B.
template <int B>
__global__ void __launch_bounds__(256) k_quantize_x(const float* __restrict__ x, int cols, int8_t* __restrict__ xq,
                                                    float* __restrict__ xd, const int32_t* __restrict__ pass) {
  pdl_enter();
  const int t = blockIdx.y, nb = cols / B, b = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (t >= n_tokens(pass) || b >= nb) return;
  const float* xb = x + int64_t(t) * cols + int64_t(b) * B;
  float v[B / 32];
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < B / 32; ++i) a = fmaxf(a, fabsf(v[i] = xb[lane + 32 * i]));
  a = warp_max(a);
  const float inv = a != 0.0f ? 127.0f / a : 0.0f;
#pragma unroll
  for (int i = 0; i < B / 32; ++i) xq[int64_t(t) * cols + int64_t(b) * B + lane + 32 * i] = int8_t(__float2int_rn(v[i] * inv));
  if (lane == 0) xd[int64_t(t) * nb + b] = __half2float(__float2half_rn(a / 127.0f));
}

// One thread's raw codes of one weight block (its row half; q3: the row's whole ql and qh).
struct Q8Raw {
  uint4 q[2];
  uint2 h;
  float d;
};

template <int DT, int B>
__device__ __forceinline__ void q8_load_block(const MatView& m, int r, int kb, int half, Q8Raw& st) {
  if (r >= m.rows || int64_t(kb) * B >= m.cols) {  // past the matrix (rows, or the last step's k): zeros
    st.q[0] = st.q[1] = make_uint4(0, 0, 0, 0);
    st.h = make_uint2(0, 0);
    st.d = 0.0f;
    return;
  }
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
}

__device__ __forceinline__ uint32_t pack4(int a, int b, int c, int d) {
  return (uint32_t(a) & 0xffu) | (uint32_t(b) & 0xffu) << 8 | (uint32_t(c) & 0xffu) << 16 | uint32_t(d) << 24;
}

// One block's codes as int8 (zero point removed) into its B bytes of the thread's shared row.
template <int DT, int B>
__device__ __forceinline__ void q8_store_block(const Q8Raw& st, int half, uint32_t* row) {
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
}

// One step's inputs in registers: KB weight blocks of the thread's row half, 32 bytes of x codes
// (token tid / 4, bytes 32 * (tid % 4)..) and, for the first 64 * KB threads, one x scale.
template <int DT, int B>
struct Q8Step {
  static constexpr int KB = kQk / B;
  Q8Raw w[KB];
  uint4 x[2];
  float xd;
};

template <int DT, int B>
__device__ __forceinline__ void q8_load(const MatView& m, const int8_t* __restrict__ xq, const float* __restrict__ xds,
                                        int r0, int t0, int n, int step, Q8Step<DT, B>& st) {
  constexpr int KB = kQk / B;
  const int tid = threadIdx.x, nb = m.cols / B;
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) q8_load_block<DT, B>(m, r0 + (tid >> 1), step * KB + kk, tid & 1, st.w[kk]);
  const int t = t0 + (tid >> 2);
  const int64_t k = int64_t(step) * kQk + 32 * (tid & 3);
  if (t < n && k < m.cols) {  // cols is a multiple of 32: a thread's 32 bytes are in or out whole
    const uint4* p = reinterpret_cast<const uint4*>(xq + int64_t(t) * m.cols + k);
    st.x[0] = __ldg(p);
    st.x[1] = __ldg(p + 1);
  } else {
    st.x[0] = st.x[1] = make_uint4(0, 0, 0, 0);
  }
  const int ts = t0 + tid / KB, kb = step * KB + tid % KB;
  st.xd = tid < kTn * KB && ts < n && kb < nb ? __ldg(xds + int64_t(ts) * nb + kb) : 0.0f;
}

template <int DT, int B>
__device__ __forceinline__ void q8_store(const Q8Step<DT, B>& st, int8_t* ws, int8_t* xs, float* wd, float* xd) {
  constexpr int KB = kQk / B;
  const int tid = threadIdx.x, rr = tid >> 1, half = tid & 1;
#pragma unroll
  for (int kk = 0; kk < KB; ++kk) {
    q8_store_block<DT, B>(st.w[kk], half, reinterpret_cast<uint32_t*>(ws + rr * kQld + kk * B));
    if (half == 0) wd[rr * KB + kk] = st.w[kk].d;
  }
  uint4* xrow = reinterpret_cast<uint4*>(xs + (tid >> 2) * kQld + 32 * (tid & 3));
  xrow[0] = st.x[0];
  xrow[1] = st.x[1];
  if (tid < kTn * KB) xd[tid] = st.xd;  // [token][KB]
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two blocks per multiprocessor (128 registers, a few spilled): 6% less time in sum over the Phi-4
// prefill mat-muls than one block of 134-174 registers on the H200 (docs/CUDA.md).
constexpr int kQ8BlocksPerSm = 2;

template <int DT, int B>
__global__ void __launch_bounds__(kThreads, kQ8BlocksPerSm) k_matmul_q8(MatView m, const float* __restrict__ x,
                                                       const int8_t* __restrict__ xq, const float* __restrict__ xds,
                                                       float* __restrict__ y, int ldy, const int32_t* __restrict__ pass) {
  constexpr int KB = kQk / B;
  pdl_enter();
  const int n = n_tokens(pass);
  const int r0 = blockIdx.x * kTm, t0 = blockIdx.y * kTn;
  if (t0 >= n) return;
  extern __shared__ __align__(16) uint8_t smem[];
  int8_t* ws = reinterpret_cast<int8_t*>(smem);            // [kTm][kQld]
  int8_t* xs = ws + kTm * kQld;                            // [kTn][kQld]
  float* wd = reinterpret_cast<float*>(xs + kTn * kQld);   // [kTm][KB]
  float* xd = wd + kTm * KB;                               // [kTn][KB]
  float* cs = reinterpret_cast<float*>(smem);              // [kTn][kCld], after the main loop
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wr = warp & 3, wt = warp >> 2;
  const int g = lane >> 2, tig = lane & 3;

  float acc[2][4][4] = {};
  Q8Step<DT, B> st;
  q8_load<DT, B>(m, xq, xds, r0, t0, n, 0, st);
  const int steps = (m.cols + kQk - 1) / kQk;  // the last step's blocks past cols are zeros
  for (int step = 0; step < steps; ++step) {
    q8_store<DT, B>(st, ws, xs, wd, xd);
    __syncthreads();
    if (step + 1 < steps) q8_load<DT, B>(m, xq, xds, r0, t0, n, step + 1, st);
#pragma unroll
    for (int kk = 0; kk < KB; ++kk) {
      int iacc[2][4][4] = {};
#pragma unroll
      for (int ks = kk * B; ks < (kk + 1) * B; ks += 32) {
        uint32_t a[2][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int8_t* p = ws + (wr * 32 + i * 16 + g) * kQld + ks + 4 * tig;
          a[i][0] = *reinterpret_cast<const uint32_t*>(p);
          a[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kQld);
          a[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
          a[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kQld + 16);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int8_t* p = xs + (wt * 32 + j * 8 + g) * kQld + ks + 4 * tig;
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
        const float d0 = wd[(wr * 32 + i * 16 + g) * KB + kk], d1 = wd[(wr * 32 + i * 16 + g + 8) * KB + kk];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int tok = wt * 32 + j * 8 + 2 * tig;
          const float x0 = xd[tok * KB + kk], x1 = xd[(tok + 1) * KB + kk];
          acc[i][j][0] += d0 * x0 * float(iacc[i][j][0]);
          acc[i][j][1] += d0 * x1 * float(iacc[i][j][1]);
          acc[i][j][2] += d1 * x0 * float(iacc[i][j][2]);
          acc[i][j][3] += d1 * x1 * float(iacc[i][j][3]);
        }
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
using MatmulQ8Kernel = void (*)(MatView, const float*, const int8_t*, const float*, float*, int, const int32_t*);

MatmulKernel pick(const Weight& w) {
  switch (w.dtype) {
    case UPG_DTYPE_F32: return k_matmul<UPG_DTYPE_F32>;
    case UPG_DTYPE_F16: return k_matmul<UPG_DTYPE_F16>;
    default: return k_matmul<UPG_DTYPE_BF16>;
  }
}

MatmulQ8Kernel pick_q8(const Weight& w) {
  const int B = w.args.block;
  switch (w.dtype) {
    case UPG_DTYPE_Q8_0: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q8_0, 32> : k_matmul_q8<UPG_DTYPE_Q8_0, 64>;
    case UPG_DTYPE_Q4: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q4, 32> : k_matmul_q8<UPG_DTYPE_Q4, 64>;
    default: return B == 32 ? k_matmul_q8<UPG_DTYPE_Q3, 32> : k_matmul_q8<UPG_DTYPE_Q3, 64>;
  }
}

size_t codes_bytes(const Weight& w) { return (size_t(w.args.n_tokens) * w.args.cols + 15) / 16 * 16; }

}  // namespace

size_t matmul_scratch(const Weight& w) {
  if (!is_quantized(DType(w.dtype))) return 0;
  return codes_bytes(w) + size_t(w.args.n_tokens) * (w.args.cols / w.args.block) * sizeof(float);
}

void matmul(const Weight& w, const float* x, float* y, const int32_t* pass, cudaStream_t s, void* scratch) {
  check_weight(w, "matmul");
  if (w.args.n_tokens < 1 || w.args.ldy < w.args.rows) throw std::invalid_argument("cuda matmul: bad n_tokens or ldy");
  const dim3 grid((w.args.rows + kTm - 1) / kTm, (w.args.n_tokens + kTn - 1) / kTn);
  if (!is_quantized(DType(w.dtype))) {
    launch("matmul", pick(w), grid, kThreads, kSmem, s, view(w), x, y, w.args.ldy, pass);
    return;
  }
  if ((reinterpret_cast<uintptr_t>(w.data) & 15) != 0)
    throw std::invalid_argument("cuda matmul: quantized weights must be 16-byte aligned");
  if (scratch == nullptr || (reinterpret_cast<uintptr_t>(scratch) & 15) != 0)
    throw std::invalid_argument("cuda matmul: quantized weights need 16-byte aligned scratch of matmul_scratch(w) bytes");
  int8_t* xq = static_cast<int8_t*>(scratch);
  float* xd = reinterpret_cast<float*>(xq + codes_bytes(w));
  const int B = w.args.block, nb = w.args.cols / B;
  const dim3 qgrid((nb + 7) / 8, w.args.n_tokens);
  if (B == 32) launch("matmul: round x", k_quantize_x<32>, qgrid, 256, 0, s, x, w.args.cols, xq, xd, pass);
  else launch("matmul: round x", k_quantize_x<64>, qgrid, 256, 0, s, x, w.args.cols, xq, xd, pass);
  launch("matmul", pick_q8(w), grid, kThreads, kSmem, s, view(w), x, static_cast<const int8_t*>(xq),
         static_cast<const float*>(xd), y, w.args.ldy, pass);
}

}  // namespace upg::cuda
