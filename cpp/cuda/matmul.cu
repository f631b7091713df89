// Prefill mat-mul on the tensor cores: y[t * ldy + r] = sum_k W[r][k] x[t][k] (+ outliers) for the
// pass's tokens. A block computes a 64-token x 128-row tile of y with 8 warps (each 32 x 32, four
// 16x16x16 f16 WMMA fragments, f32 accumulation). Per 64-wide k step the block decodes its weight
// tile once into shared memory as f16 (any UPG type), rounds the x tile to f16 beside it, and the
// next step's raw codes are loaded into registers while the current step multiplies. Ragged rows,
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

// Raw codes of one thread's 32 weight elements (quantized types): row tid / 2, elements
// k0 + 32 * (tid % 2) + [0, 32).
struct RawTile {
  uint4 q[2];   // up to 32 bytes of qs / ql
  uint2 h;      // q3: up to 8 bytes of qh
  float d;
  bool valid;
};

template <int DT, int B>
__device__ __forceinline__ RawTile load_raw(const MatView& m, int r, int k0, int half) {
  RawTile t{};
  const int k = k0 + 32 * half;
  t.valid = r < m.rows && k < m.cols;
  if (!t.valid) return t;
  const int64_t rc = int64_t(r) * m.cols;
  t.d = f16(m.scales[int64_t(r) * (m.cols / B) + k / B]);
  if constexpr (DT == UPG_DTYPE_Q8_0) {
    const uint4* p = reinterpret_cast<const uint4*>(m.codes + rc + k);
    t.q[0] = __ldg(p);
    t.q[1] = __ldg(p + 1);
  } else if constexpr (DT == UPG_DTYPE_Q4) {
    if constexpr (B == 32) {
      t.q[0] = __ldg(reinterpret_cast<const uint4*>(m.codes + (rc + k) / 2));
    } else {
      const uint4* p = reinterpret_cast<const uint4*>(m.codes + (rc + k0) / 2);
      t.q[0] = __ldg(p);
      t.q[1] = __ldg(p + 1);
    }
  } else {
    if constexpr (B == 32) {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(m.codes + (rc + k) / 4));
      t.q[0] = make_uint4(q.x, q.y, 0, 0);
      t.h.x = __ldg(reinterpret_cast<const unsigned int*>(m.high + (rc + k) / 8));
    } else {
      t.q[0] = __ldg(reinterpret_cast<const uint4*>(m.codes + (rc + k0) / 4));
      t.h = __ldg(reinterpret_cast<const uint2*>(m.high + (rc + k0) / 8));
    }
  }
  return t;
}

__device__ __forceinline__ int byte_of(const uint4* q, int i) {
  const uint32_t* w = reinterpret_cast<const uint32_t*>(q);
  return (w[i >> 2] >> (8 * (i & 3))) & 0xff;
}

// Element j (0..31) of the thread's 32, as f16.
template <int DT, int B>
__device__ __forceinline__ __half decode(const RawTile& t, int half, int j) {
  int q;
  if constexpr (DT == UPG_DTYPE_Q8_0) {
    q = int(int8_t(byte_of(t.q, j)));
  } else if constexpr (DT == UPG_DTYPE_Q4) {
    const int e = B == 32 ? j : 32 * half + j;  // element within the block
    const int b = byte_of(t.q, e % (B / 2));
    q = (e < B / 2 ? (b & 15) : (b >> 4)) - UPG_Q4_ZERO;
  } else {
    const int e = B == 32 ? j : 32 * half + j;
    const uint32_t hw = (e % (B / 8)) < 4 ? t.h.x : t.h.y;
    const int lo = (byte_of(t.q, e % (B / 4)) >> (2 * (e / (B / 4)))) & 3;
    const int hi = (hw >> (8 * ((e % (B / 8)) & 3) + e / (B / 8))) & 1;
    q = (lo | (hi << 2)) - UPG_Q3_ZERO;
  }
  return __float2half_rn(t.d * float(q));
}

template <int DT, int B>
__device__ __forceinline__ void store_raw(__half* ws, const RawTile& t, int rr, int half) {
  alignas(16) __half v[32];
#pragma unroll
  for (int j = 0; j < 32; ++j) v[j] = t.valid ? decode<DT, B>(t, half, j) : __float2half(0.0f);
  uint4* dst = reinterpret_cast<uint4*>(ws + rr * kLd + 32 * half);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = reinterpret_cast<const uint4*>(v)[i];
}

template <int DT, int B>
__global__ void __launch_bounds__(kThreads) k_matmul(MatView m, const float* __restrict__ x, float* __restrict__ y,
                                                    int ldy, const int32_t* __restrict__ pass) {
  constexpr bool kQuant = DT == UPG_DTYPE_Q8_0 || DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_Q3;
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

  const int rr = tid >> 1, half = tid & 1;
  RawTile raw{};
  if constexpr (kQuant) raw = load_raw<DT, B>(m, r0 + rr, 0, half);
  for (int k0 = 0; k0 < m.cols; k0 += kTk) {
    if constexpr (kQuant) {
      store_raw<DT, B>(ws, raw, rr, half);
      if (k0 + kTk < m.cols) raw = load_raw<DT, B>(m, r0 + rr, k0 + kTk, half);
    } else {
#pragma unroll 8
      for (int j = 0; j < kTm * kTk / kThreads; ++j) {
        const int e = tid + kThreads * j, r = r0 + e / kTk, k = k0 + e % kTk;
        ws[(e / kTk) * kLd + e % kTk] = __float2half_rn(r < m.rows && k < m.cols ? elem<DT, B>(m, r, k) : 0.0f);
      }
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
  for (int e = tid; e < kTn * kTm; e += kThreads) {
    const int t = t0 + e / kTm, r = r0 + e % kTm;
    if (t >= n || r >= m.rows) continue;
    float v = cs[(e / kTm) * kCld + e % kTm];
    if (m.rowptr != nullptr)
      for (int o = m.rowptr[r]; o < m.rowptr[r + 1]; ++o) v += f16(m.val[o]) * x[int64_t(t) * m.cols + m.col[o]];
    y[int64_t(t) * ldy + r] = v;
  }
}

using MatmulKernel = void (*)(MatView, const float*, float*, int, const int32_t*);

MatmulKernel pick(const Weight& w) {
  const int B = w.args.block;
  switch (w.dtype) {
    case UPG_DTYPE_F32: return k_matmul<UPG_DTYPE_F32, 0>;
    case UPG_DTYPE_F16: return k_matmul<UPG_DTYPE_F16, 0>;
    case UPG_DTYPE_BF16: return k_matmul<UPG_DTYPE_BF16, 0>;
    case UPG_DTYPE_Q8_0: return B == 32 ? k_matmul<UPG_DTYPE_Q8_0, 32> : k_matmul<UPG_DTYPE_Q8_0, 64>;
    case UPG_DTYPE_Q4: return B == 32 ? k_matmul<UPG_DTYPE_Q4, 32> : k_matmul<UPG_DTYPE_Q4, 64>;
    default: return B == 32 ? k_matmul<UPG_DTYPE_Q3, 32> : k_matmul<UPG_DTYPE_Q3, 64>;
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
