// Prefill mat-mul on the tensor cores: y[t * ldy + r] = sum_k W[r][k] x[t][k] (+ outliers) for the
// pass's tokens. Quantized weights (k_matmul_q8): their int8 codes times x rounded to 8 bits per
// block, as the mat-vec and the CPU round it, on mma.m16n8k32 s8 (the grid types' codes decoded to
// their int8 grid values as the warps load their fragments), in a tile chosen by the launch's token
// capacity (a 128-row x 64-token tile for prompts, 32-row x 8 or 32-token tiles for a step's
// generated tokens) with the same sums per (row, token) in every tile. Dense weights (k_matmul): a
// 64-token x 128-row tile of 8 warps of 32 x 32, W and x rounded to f16 in shared memory per 64-wide
// k step, four 16x16x16 WMMA fragments per warp, f32 accumulation. Ragged rows, tokens and k are
// zero-filled on load and skipped on store; the outliers are added in the epilogue from the f32
// activations.
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

// The block's output tile, cs [TN tokens][TM + 4] (rows contiguous), plus the rows' outliers times the
// f32 activations, into y: consecutive threads write consecutive rows of one token.
template <int TM, int TN, int THREADS>
__device__ __forceinline__ void store_tile(const MatView& m, const float* __restrict__ x, float* __restrict__ y,
                                           int ldy, const float* cs, int r0, int t0, int n) {
  for (int e = threadIdx.x; e < TN * TM; e += THREADS) {
    const int t = t0 + e / TM, r = r0 + e % TM;
    if (t >= n || r >= m.rows) continue;
    float v = cs[(e / TM) * (TM + 4) + e % TM];
    if (m.rowptr != nullptr)
      for (int o = m.rowptr[r]; o < m.rowptr[r + 1]; ++o) v += f16(m.val[o]) * x[int64_t(t) * m.cols + m.col[o]];
    y[int64_t(t) * ldy + r] = v;
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) k_matmul(MatView m, const float* __restrict__ x, float* __restrict__ y,
                                                    int ldy, int cap, const int32_t* __restrict__ pass) {
  pdl_enter();
  const int n = min(n_tokens(pass), cap);
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
  store_tile<kTm, kTn, kThreads>(m, x, y, ldy, cs, r0, t0, n);
}

// ---- 8-bit tensor-core mat-mul for the quantized types ----
// The weights' integer codes times x rounded to 8 bits per weight block exactly as the decode
// mat-vec and the CPU round it (d = f16(amax / 127), q = rint(x * 127 / amax)). k_quantize_x
// rounds the pass's rows of x once into the scratch (codes, scales, and each block's code sum);
// then per block of B along k, B / 32 mma.m16n8k32 (u8 or s8 weights x s8 x -> s32) and the
// block's integer sums scaled by d_w * d_x into the f32 accumulators, in the order of k. For q4
// and q3 the mma's accumulator input starts at kMagic - zero * sum(x codes of the block): the
// zero point comes off inside the exact integer sum (the weights enter the mma as their raw
// unsigned codes: q4 nibbles masked, q3's bit planes combined), and the sum i comes out as the
// bits of the float 1.5 * 2^23 + i (|i| < 2^21 here), so float(i) is one exact f32 subtraction.
// q8_0's codes are signed: its sums start at 0 and convert with I2F (see to_float); so are the grid
// types' (iq4_nl, iq4_xs, iq3), whose A words are the grid values their codes index, looked up by
// byte_perm (common.cuh) from the raw codes in shared memory, with one scale per block of 32 (the
// super-block types: d * (ls - 32), formed with the step's scales).
// Every (row, token) of y is one thread's f32 chain over the weight blocks in the order of k, so a
// row's bits do not depend on the tile, nor on how many tokens the launch holds: the tile is picked
// by the capacity (Shape below). A k step is 128 of k: the weights' raw file bytes and the x codes
// go to shared memory by cp.async (16-byte copies where the layout allows), kStages steps in flight,
// one barrier per step; the warps decode their A fragments from the raw bytes as they load them,
// and take x's B fragments with ldmatrix.
constexpr int kQk = 128;          // k per step
constexpr int kQxLd = kQk + 16;   // bytes per shared x row: ldmatrix's 8 rows fall on distinct bank groups

// The x scales' row stride: tokens of one block contiguous, in 16-byte chunks (the DIRECT tiles
// copy them by cp.async).
__host__ __device__ constexpr int scales_ld(int cap) { return (cap + 3) / 4 * 4; }

// xq [cap][cols] int8, xd [cols / B][scales_ld(cap)] f32 and xz (same) = kMagic - zero * (the
// codes' sum) of the pass's rows (at most cap: a pass may hold more tokens than this launch's x);
// one warp per block of B. Grid y: scales_ld(cap); the scales of tokens past those are 0 and kMagic,
// so whole chunks may be copied.
template <int B>
__global__ void __launch_bounds__(256) k_quantize_x(const float* __restrict__ x, int cols, int cap, int zero,
                                                    int8_t* __restrict__ xq, float* __restrict__ xd,
                                                    int32_t* __restrict__ xz, const int32_t* __restrict__ pass) {
  pdl_enter();
  const int t = blockIdx.y, ld = gridDim.y, nb = cols / B, b = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (b >= nb) return;
  if (t >= min(n_tokens(pass), cap)) {
    if (lane == 0) {
      xd[int64_t(b) * ld + t] = 0.0f;
      xz[int64_t(b) * ld + t] = kMagic;
    }
    return;
  }
  const float* xb = x + int64_t(t) * cols + int64_t(b) * B;
  float v[B / 32];
  float a = 0.0f;
#pragma unroll
  for (int i = 0; i < B / 32; ++i) a = fmaxf(a, fabsf(v[i] = xb[lane + 32 * i]));
  a = warp_max(a);
  const float inv = a != 0.0f ? 127.0f / a : 0.0f;
  int sum = 0;
#pragma unroll
  for (int i = 0; i < B / 32; ++i) {
    const int q = __float2int_rn(v[i] * inv);
    xq[int64_t(t) * cols + int64_t(b) * B + lane + 32 * i] = int8_t(q);
    sum += q;
  }
  sum = __reduce_add_sync(0xffffffffu, sum);
  if (lane == 0) {
    xd[int64_t(b) * ld + t] = __half2float(__float2half_rn(a / 127.0f));
    xz[int64_t(b) * ld + t] = kMagic - zero * sum;
  }
}

// A block's tile: WR x WT warps, each I row fragments of 16 by J token fragments of 8; a pipeline
// step of G k groups of kQk, at most S steps in flight, the scales loaded LA steps ahead into
// registers, or (DIRECT) copied by cp.async with the codes into each group's stage; MIN_BLOCKS
// blocks a multiprocessor (the launch bound).
template <int WR_, int WT_, int I_, int J_, int G_, int S_, int LA_, int MIN_BLOCKS_, bool DIRECT_ = false>
struct Shape {
  static constexpr int WR = WR_, WT = WT_, I = I_, J = J_, G = G_, S = S_, LA = LA_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int TM = WR * 16 * I, TN = WT * 8 * J, THREADS = 32 * WR * WT;
  static constexpr bool DIRECT = DIRECT_;
};
// Prompts: 128 rows x 64 tokens, 8 warps of 32 x 32, two blocks a multiprocessor (128 registers;
// 1 block of more registers measured slower). A step's generated tokens: 32-row tiles, so that even
// the 5120-row matrices spread over every multiprocessor, and several k groups a pipeline step:
// a step waits for its scales' loads, which the small tiles' few products do not hide (one group
// a step: 1 us a step, 350 GB/s, on the H200); loaded two steps ahead they cost 2-4% less than
// one step ahead, three steps ahead no better (docs/CUDA.md).
using PromptTile = Shape<4, 2, 2, 4, 1, 4, 1, 2>;
using Tokens8Tile = Shape<2, 1, 1, 1, 4, 4, 2, 3>;
using Tokens32Tile = Shape<2, 1, 1, 4, 2, 4, 2, 3>;
// The token tiles with their scales in the pipeline, where the weights' f16 scales of a k group
// are 4- or 8-byte aligned words (cols a multiple of kQk; not the super-block types, whose scales
// are decoded from two sections): the register-staged scales' loads cost about a quarter of the
// 32-token tile's time (docs/CUDA.md).
using Tokens8Direct = Shape<2, 1, 1, 1, 4, 4, 2, 3, true>;
using Tokens32Direct = Shape<2, 1, 1, 4, 2, 4, 2, 3, true>;

// Shared-memory layout of one k step of the tile: the weights' raw bytes (codes; q3 also its high
// bits) per row, padded so that a fragment load's 8 rows x 4 words hit 32 distinct banks, then
// the x codes; DIRECT tiles then the group's scales (the weights' f16 [TM][KB], x's f32 [KB][TN] and
// the zero-point starts [KB][TN]). Other tiles keep their scales in two slots of their own
// (register-staged one step ahead: the weights' f16 scales need not be 4-byte aligned, which
// cp.async requires).
template <int DT>
constexpr bool kHigh = DT == UPG_DTYPE_Q3 || DT == UPG_DTYPE_IQ3;  // a qh section
template <int DT>
constexpr bool kSigned = DT == UPG_DTYPE_Q8_0 || kGridType<DT>;    // signed int8 A words

template <int DT, int B, typename SH>
struct Q8Tile {
  static constexpr int KB = kQk / B;                                              // weight blocks per step
  static constexpr int kCodes = DT == UPG_DTYPE_Q8_0 ? kQk
                              : (DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS) ? kQk / 2
                              : kQk / 4;                                          // bytes / row
  static constexpr int kBlockBytes = kCodes / KB;                                 // one block's codes
  static constexpr int kCopy = kBlockBytes < 16 ? kBlockBytes : 16;               // q3 at B = 32: 8-byte copies
  static constexpr int kCodesLd = kCodes + 16;                                    // 144, 80, 48 bytes
  static constexpr int kHighLd = kHigh<DT> ? 24 : 0;                             // qh (16 bytes / row), 6 words
  static constexpr int kW = SH::TM * kCodesLd, kH = SH::TM * kHighLd, kX = SH::TN * kQxLd;
  static constexpr int kWs = SH::DIRECT ? SH::TM * KB * 2 : 0, kXs = SH::DIRECT ? SH::TN * KB * 4 : 0;
  static constexpr int kStage = kW + kH + kX + kWs + 2 * kXs;                     // one group; a multiple of 16
  // where a stage's sections start: the x codes, then (DIRECT) the weights' scales, x's, the starts
  static constexpr int kXAt = kW + kH, kWsAt = kXAt + kX, kXdAt = kWsAt + kWs, kXzAt = kXdAt + kXs;
  static constexpr int kScales = SH::DIRECT ? 0 : (SH::TM + 2 * SH::TN) * KB * 4; // wd f32, xd f32, xz int32
  static constexpr int kStep = SH::G * kStage, kStepScales = SH::G * kScales;     // a pipeline step
  // As many steps in flight as fit two blocks on a multiprocessor, at most S (prompt tile: q8_0 3,
  // q4 and q3 4).
  static constexpr int kStages0 = (110 * 1024 - 2 * kStepScales) / kStep;
  static constexpr int kStages = kStages0 > SH::S ? SH::S : kStages0;
  static constexpr size_t kOut = size_t(SH::TN) * (SH::TM + 4) * 4;              // the output tile
  static constexpr size_t kPipe = size_t(kStages) * kStep + 2 * kStepScales;
  static constexpr size_t kSmem = kPipe > kOut ? kPipe : kOut;
  static_assert(kStages >= 2, "one k step must fit twice");
};

// `total` items (copies, scales) share out over a tile's threads: thread tid takes items
// tid + threads q for q < kShares, of which those past the total (only where the count is no
// multiple of the threads) are none.
template <int total, int threads>
constexpr int kShares = (total + threads - 1) / threads;
template <int total, int threads>
__device__ __forceinline__ bool past(int e) { return total % threads != 0 && e >= total; }

// One step's scales, loaded into registers a step ahead and stored after the step's compute.
template <int DT, int B, typename SH>
struct Q8Scales {
  static constexpr int KB = kQk / B, WQ = kShares<SH::TM * KB, SH::THREADS>;   // the weights' per thread
  static constexpr int XQ = kShares<SH::TN * KB, SH::THREADS>;                  // x's
  float wd[WQ];
  float xd[XQ];
  int xz[XQ];
};

// A thread's share of every k group's copies and scale loads, worked out once per launch: the
// group's loads then add only the group's offset (redone every step, the per-copy row, token and
// bound arithmetic was a third of the 32-token tile's instructions: docs/CUDA.md). A load whose row
// or token is past the matrix or the pass gets a block index no group reaches (kNever), so one
// comparison with the block count zero-fills it, as the blocks past cols are.
template <int DT, int B, typename SH>
struct Q8Plan {
  using L = Q8Tile<DT, B, SH>;
  using S = Q8Scales<DT, B, SH>;
  static constexpr int KB = L::KB, threads = SH::THREADS, kNever = 1 << 29;
  static constexpr int per_row = L::kCodes / L::kCopy, copies = SH::TM * per_row;  // weight copies of a group
  static constexpr int NW = kShares<copies, threads>;
  static constexpr int highs = SH::TM * KB, NH = kHigh<DT> ? kShares<highs, threads> : 0;  // q3 qh copies
  static constexpr int chunks = SH::TN * (kQk / 16), NX = kShares<chunks, threads>;      // x's 16-byte chunks
  // DIRECT: a row's KB f16 weight scales (one 8- or 4-byte copy), x's scales and zero-point starts
  // in 16-byte chunks of 4 tokens
  static constexpr int NWS = SH::DIRECT ? kShares<SH::TM, threads> : 0;
  static constexpr int xs_chunks = KB * SH::TN / 4, NXS = SH::DIRECT ? kShares<xs_chunks, threads> : 0;
  const uint8_t* w_src[NW];
  int w_dst[NW], w_kb[NW];
  const uint8_t* h_src[NH > 0 ? NH : 1];
  int h_dst[NH > 0 ? NH : 1], h_kb[NH > 0 ? NH : 1];
  const int8_t* x_src[NX];
  int x_dst[NX], x_k[NX];
  const uint16_t* s_w[S::WQ];  // a weight scale's row at group 0 (f16-scale types)
  int s_wkb[S::WQ], s_wq[S::WQ];
  int s_x[S::XQ], s_xkb[S::XQ];  // x's scales: offset at group 0 into xds / xzs
  const uint16_t* ws_src[NWS > 0 ? NWS : 1];
  int ws_dst[NWS > 0 ? NWS : 1];
  bool ws_ok[NWS > 0 ? NWS : 1];
  int xs_src[NXS > 0 ? NXS : 1], xs_dst[NXS > 0 ? NXS : 1];  // offset at group 0 into xds / xzs
  bool xs_ok[NXS > 0 ? NXS : 1];
  int nb, cols, ldx;

  __device__ __forceinline__ Q8Plan(const MatView& m, const int8_t* __restrict__ xq, int r0, int t0, int n, int cap) {
    const int tid = threadIdx.x;
    nb = m.cols / B;
    cols = m.cols;
    ldx = scales_ld(cap);
    const int64_t row_bytes = int64_t(m.cols) * L::kCodes / kQk;
#pragma unroll
    for (int q = 0; q < NW; ++q) {
      const int e = tid + threads * q, rr = e / per_row, c = e % per_row, r = r0 + rr;
      const bool ok = !past<copies, threads>(e) && r < m.rows;
      w_src[q] = m.codes + (ok ? int64_t(r) * row_bytes + c * L::kCopy : 0);
      w_dst[q] = rr * L::kCodesLd + c * L::kCopy;
      w_kb[q] = ok ? c * L::kCopy / L::kBlockBytes : kNever;
    }
#pragma unroll
    for (int q = 0; q < NH; ++q) {  // qh: one copy of B / 8 bytes per block (iq3: the group's 16 bytes)
      const int e = tid + threads * q, rr = e / KB, c = e % KB, r = r0 + rr;
      const bool ok = !past<highs, threads>(e) && r < m.rows;
      h_src[q] = m.high + (ok ? int64_t(r) * (m.cols / 8) + c * (B / 8) : 0);
      h_dst[q] = L::kW + rr * L::kHighLd + c * (B / 8);
      h_kb[q] = ok ? c : kNever;
    }
#pragma unroll
    for (int q = 0; q < NX; ++q) {  // cols is a multiple of 32, so a chunk is in or out whole
      const int e = tid + threads * q, tt = e / (kQk / 16), c = e % (kQk / 16), t = t0 + tt;
      const bool ok = !past<chunks, threads>(e) && t < n;
      x_src[q] = xq + (ok ? int64_t(t) * m.cols + 16 * c : 0);
      x_dst[q] = L::kXAt + tt * kQxLd + 16 * c;
      x_k[q] = ok ? 16 * c : kNever;
    }
#pragma unroll
    for (int q = 0; q < S::WQ; ++q) {
      const int e = tid + threads * q, r = r0 + e / KB;
      const bool ok = !past<SH::TM * KB, threads>(e) && r < m.rows;
      s_w[q] = m.scales + (ok ? int64_t(r) * nb + e % KB : 0);
      s_wkb[q] = ok ? e % KB : kNever;
      s_wq[q] = ok ? r : 0;
    }
#pragma unroll
    for (int q = 0; q < S::XQ; ++q) {
      const int e = tid + threads * q, t = t0 + e / KB;
      const bool ok = e < SH::TN * KB && t < n;
      s_x[q] = ok ? (e % KB) * ldx + t : 0;
      s_xkb[q] = ok ? e % KB : kNever;
    }
#pragma unroll
    for (int q = 0; q < NWS; ++q) {
      const int rr = tid + threads * q, r = r0 + rr;
      ws_ok[q] = !past<SH::TM, threads>(rr) && r < m.rows;
      ws_src[q] = m.scales + (ws_ok[q] ? int64_t(r) * nb : 0);
      ws_dst[q] = L::kWsAt + rr * KB * 2;
    }
#pragma unroll
    for (int q = 0; q < NXS; ++q) {
      const int e = tid + threads * q, kk = e / (SH::TN / 4), c = e % (SH::TN / 4);
      xs_ok[q] = !past<xs_chunks, threads>(e) && t0 + 4 * c < n;
      xs_src[q] = xs_ok[q] ? kk * ldx + t0 + 4 * c : 0;
      xs_dst[q] = L::kXdAt + (kk * SH::TN + 4 * c) * 4;  // xd; xz at the same place of its section
    }
  }

  // The copies of k group `group` into one stage (blocks past cols, rows past the matrix and tokens
  // past the pass zero-filled).
  __device__ __forceinline__ void issue(const MatView& m, const int8_t* __restrict__ xq, const float* __restrict__ xds,
                                        const int32_t* __restrict__ xzs, int group, uint8_t* stage) const {
#pragma unroll
    for (int q = 0; q < NW; ++q) {
      if (past<copies, threads>(int(threadIdx.x) + threads * q)) break;
      const bool ok = group * KB + w_kb[q] < nb;
      cp_async<L::kCopy>(stage + w_dst[q], ok ? w_src[q] + int64_t(group) * L::kCodes : m.codes, ok);
    }
#pragma unroll
    for (int q = 0; q < NH; ++q) {
      if (past<highs, threads>(int(threadIdx.x) + threads * q)) break;
      const bool ok = group * KB + h_kb[q] < nb;
      cp_async<B / 8>(stage + h_dst[q], ok ? h_src[q] + int64_t(group) * (kQk / 8) : m.high, ok);
    }
#pragma unroll
    for (int q = 0; q < NX; ++q) {
      if (past<chunks, threads>(int(threadIdx.x) + threads * q)) break;
      const bool ok = group * kQk + x_k[q] < cols;
      cp_async<16>(stage + x_dst[q], ok ? x_src[q] + int64_t(group) * kQk : xq, ok);
    }
    // DIRECT: every group is whole (cols a multiple of kQk)
#pragma unroll
    for (int q = 0; q < NWS; ++q) {
      if (past<SH::TM, threads>(int(threadIdx.x) + threads * q)) break;
      cp_async<KB * 2>(stage + ws_dst[q], ws_src[q] + (ws_ok[q] ? group * KB : 0), ws_ok[q]);
    }
#pragma unroll
    for (int q = 0; q < NXS; ++q) {
      if (past<xs_chunks, threads>(int(threadIdx.x) + threads * q)) break;
      const int off = xs_ok[q] ? xs_src[q] + group * KB * ldx : 0;
      cp_async<16>(stage + xs_dst[q], xds + off, xs_ok[q]);
      cp_async<16>(stage + xs_dst[q] + (L::kXzAt - L::kXdAt), xzs + off, xs_ok[q]);
    }
  }

  __device__ __forceinline__ void load_scales(const MatView& m, const float* __restrict__ xds,
                                              const int32_t* __restrict__ xzs, int group, S& sc) const {
#pragma unroll
    for (int q = 0; q < S::WQ; ++q) {
      if (past<SH::TM * KB, threads>(int(threadIdx.x) + threads * q)) break;
      const int kb = group * KB + s_wkb[q];
      if constexpr (kGridType<DT>) sc.wd[q] = kb < nb ? grid_scale<DT>(m.scales, m.sub, m.cols, s_wq[q], kb) : 0.0f;
      else sc.wd[q] = kb < nb ? f16(__ldg(s_w[q] + group * KB)) : 0.0f;
    }
#pragma unroll
    for (int q = 0; q < S::XQ; ++q) {
      const bool ok = group * KB + s_xkb[q] < nb;
      sc.xd[q] = ok ? __ldg(xds + s_x[q] + group * KB * ldx) : 0.0f;
      sc.xz[q] = ok ? __ldg(xzs + s_x[q] + group * KB * ldx) : kMagic;
    }
  }
};

// slot: wd [TM][KB], xd [KB][TN], xz [KB][TN] (a thread's two adjacent tokens in one 8-byte load)
template <int DT, int B, typename SH>
__device__ __forceinline__ void q8_store_scales(const Q8Scales<DT, B, SH>& sc, float* slot) {
  using S = Q8Scales<DT, B, SH>;
  constexpr int KB = kQk / B, TM = SH::TM, TN = SH::TN;
  const int tid = threadIdx.x;
#pragma unroll
  for (int q = 0; q < S::WQ; ++q)
    if (const int e = tid + SH::THREADS * q; !past<TM * KB, SH::THREADS>(e)) slot[e] = sc.wd[q];
#pragma unroll
  for (int q = 0; q < S::XQ; ++q) {
    const int i = tid + SH::THREADS * q;
    if (i < TN * KB) {
      const int e = (i % KB) * TN + i / KB;
      slot[TM * KB + e] = sc.xd[q];
      reinterpret_cast<int32_t*>(slot)[(TM + TN) * KB + e] = sc.xz[q];
    }
  }
}

// Word h (0: k 4 tig.., 1: k 16 + 4 tig..) of the A fragment of 32-slice s of block kk, for the
// shared row `w` (q3: and its high bits `hb`): four int8 or uint8 codes, k consecutive.
template <int DT, int B>
__device__ __forceinline__ uint32_t q8_a_word(const uint8_t* w, const uint8_t* hb, int kk, int s, int h, int tig) {
  const int j0 = 32 * s + 16 * h + 4 * tig;  // first element of the word in the block
  if constexpr (DT == UPG_DTYPE_Q8_0) {
    return *reinterpret_cast<const uint32_t*>(w + kk * B + j0);
  } else if constexpr (DT == UPG_DTYPE_Q4) {  // byte j % (B / 2), nibble j / (B / 2)
    const uint32_t q = *reinterpret_cast<const uint32_t*>(w + kk * (B / 2) + j0 % (B / 2));
    return (q >> (4 * (j0 / (B / 2)))) & 0x0f0f0f0fu;
  } else if constexpr (DT == UPG_DTYPE_Q3) {  // low bits at ql byte j % (B / 4), shift 2 (j / (B / 4)); high bit at qh byte j % (B / 8), bit j / (B / 8)
    const uint32_t lo = *reinterpret_cast<const uint32_t*>(w + kk * (B / 4) + j0 % (B / 4));
    const uint32_t hi = *reinterpret_cast<const uint32_t*>(hb + kk * (B / 8) + j0 % (B / 8));
    return ((lo >> (2 * (j0 / (B / 4)))) & 0x03030303u) | (((hi >> (j0 / (B / 8))) & 0x01010101u) << 2);
  } else {  // iq3 (B = 32, the step one group): low bits at ql byte j, shift 2 kk; high bit at qh byte j % 16, bit 2 kk + j / 16
    const uint32_t lo = *reinterpret_cast<const uint32_t*>(w + j0);
    const uint32_t hi = *reinterpret_cast<const uint32_t*>(hb + j0 % 16);
    const uint32_t c = ((lo >> (2 * kk)) & 0x03030303u) | (((hi >> (2 * kk + j0 / 16)) & 0x01010101u) << 2);
    const uint32_t sel = prmt(c | (c >> 4), 0, 0x0020);  // the 4 codes (< 8) as selector nibbles
    return prmt(kGrid3W0, kGrid3W1, sel);
  }
}

// The A fragment (a[0], a[2]: row g, words h = 0, 1; a[1], a[3]: row g + 8) of 32-slice s of block
// kk, from the rows' shared bytes w0 and high bits h0, rows ld (hld) bytes apart. iq4: one code
// word holds both h words of a row (nibble h of bytes 4 tig..), decoded together.
template <int DT, int B>
__device__ __forceinline__ void q8_a_frag(uint32_t (&a)[4], const uint8_t* w0, const uint8_t* h0, int ld, int hld,
                                          int kk, int s, int tig) {
  if constexpr (DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS) {  // B = 32
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint2 v = grid4_words(*reinterpret_cast<const uint32_t*>(w0 + 8 * i * ld + kk * 16 + 4 * tig));
      a[i] = v.x;
      a[2 + i] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = q8_a_word<DT, B>(w0 + 8 * (i & 1) * ld, h0 + 8 * (i & 1) * hld, kk, s, i >> 1, tig);
  }
}

// The integer sum as f32, float(i) either way. On the H200 the kMagic start took 4% less time
// than a separate zero-point correction plus I2F for q4 and q3, and I2F 4.5% less than the
// kMagic start for q8_0 (docs/CUDA.md).
template <int ZERO>
__device__ __forceinline__ float to_float(int v) {
  if constexpr (ZERO != 0) return __int_as_float(v) - kMagicF;
  else return float(v);
}

// d = a b + c, with c = (c0, c1, c0, c1): s8 weights (q8_0, the grid types) or u8 (the raw codes of q4 and q3).
template <int DT>
__device__ __forceinline__ void mma_i8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int c0, int c1) {
  if constexpr (kSigned<DT>)
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%10,%11};"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c0), "r"(c1));
  else
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%10,%11};"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c0), "r"(c1));
}
// d += a b
template <int DT>
__device__ __forceinline__ void mma_i8(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (kSigned<DT>)
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// x's B fragments of 32-slice ks for the warp's J token fragments from token row tok0: b[j][h], k
// half h (ldmatrix: four 8x8 matrices, two token fragments, per x4; one fragment by x2).
template <int J>
__device__ __forceinline__ void q8_b_frags(uint32_t (&b)[J][2], const uint8_t* xs, int tok0, int ks, int lane) {
  if constexpr (J == 1) {
    uint32_t r[2];
    const unsigned a = static_cast<unsigned>(
        __cvta_generic_to_shared(xs + (tok0 + (lane & 7)) * kQxLd + ks + 16 * ((lane >> 3) & 1)));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    b[0][0] = r[0];
    b[0][1] = r[1];
  } else {
#pragma unroll
    for (int jj = 0; jj < J; jj += 2) {  // matrix q of the x4: tokens j = jj + q / 2, k half q % 2
      const int q = lane >> 3;
      uint32_t r[4];
      ldmatrix_x4(r, xs + (tok0 + (jj + q / 2) * 8 + (lane & 7)) * kQxLd + ks + 16 * (q & 1));
      b[jj][0] = r[0];
      b[jj][1] = r[1];
      b[jj + 1][0] = r[2];
      b[jj + 1][1] = r[3];
    }
  }
}

// Grid: (token tiles, row tiles), the token tiles of one row tile side by side, so that a row
// tile's weights come from DRAM once and the other token tiles read them from L2.
template <int DT, int B, typename SH>
__global__ void __launch_bounds__(SH::THREADS, SH::MIN_BLOCKS) k_matmul_q8(MatView m, const float* __restrict__ x,
                                                       const int8_t* __restrict__ xq, const float* __restrict__ xds,
                                                       const int32_t* __restrict__ xzs, float* __restrict__ y, int ldy,
                                                       int cap, const int32_t* __restrict__ pass) {
  using L = Q8Tile<DT, B, SH>;
  constexpr int KB = L::KB, S = L::kStages, TM = SH::TM, TN = SH::TN, I = SH::I, J = SH::J, G = SH::G, LA = SH::LA;
  constexpr int zero = DT == UPG_DTYPE_Q4 ? UPG_Q4_ZERO : DT == UPG_DTYPE_Q3 ? UPG_Q3_ZERO : 0;
  constexpr bool kUnroll = I * J <= 4;
  pdl_enter();
  const int n = min(n_tokens(pass), cap);
  const int t0 = blockIdx.x * TN, r0 = blockIdx.y * TM;
  if (t0 >= n) return;
  extern __shared__ __align__(16) uint8_t smem[];
  float* scales = reinterpret_cast<float*>(smem + S * L::kStep);  // two slots of kStepScales bytes
  float* cs = reinterpret_cast<float*>(smem);                      // [TN][TM + 4], after the main loop
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wr = warp % SH::WR, wt = warp / SH::WR;
  const int g = lane >> 2, tig = lane & 3;
  const int row0 = wr * 16 * I, tok0 = wt * 8 * J;  // the warp's first row and token in the tile
  constexpr int slot_floats = L::kScales / 4;

  const int groups = (m.cols + kQk - 1) / kQk;  // the last group's blocks past cols are zeros
  const int steps = (groups + G - 1) / G;        // groups past the last are neither copied nor summed
  const Q8Plan<DT, B, SH> plan(m, xq, r0, t0, n, cap);
  const auto issue = [&](int step) {
#pragma unroll
    for (int gi = 0; gi < G; ++gi)
      if (step * G + gi < groups) plan.issue(m, xq, xds, xzs, step * G + gi, smem + (step % S) * L::kStep + gi * L::kStage);
  };
  // Other than DIRECT: the scales of the steps ahead in registers, step s's in sc[s % LA]: loaded LA
  // steps before their step, stored into its slot at the end of the step before it.
  using Scales = Q8Scales<DT, B, SH>[G];
  Scales sc[LA];
  const auto load_scales = [&](int step, Scales& r) {
#pragma unroll
    for (int gi = 0; gi < G; ++gi)
      if (step * G + gi < groups) plan.load_scales(m, xds, xzs, step * G + gi, r[gi]);
  };
  const auto store_scales = [&](int step, const Scales& r) {
#pragma unroll
    for (int gi = 0; gi < G; ++gi)
      if (step * G + gi < groups) q8_store_scales<DT, B, SH>(r[gi], scales + (step & 1) * G * slot_floats + gi * slot_floats);
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    if (s < steps) issue(s);
    cp_commit();
  }
  if constexpr (!SH::DIRECT) {
    load_scales(0, sc[0]);
    store_scales(0, sc[0]);
#pragma unroll
    for (int a = 1; a < LA; ++a)
      if (a < steps) load_scales(a, sc[a]);
  }

  float acc[I][J][4] = {};
  for (int s0 = 0; s0 < steps; s0 += LA)
#pragma unroll
  for (int u = 0; u < LA; ++u) {  // unrolled, so that sc's index is known: the registers stay registers
    const int step = s0 + u;
    if (step >= steps) break;
    cp_wait<S - 2>();  // this step's copies (each thread's own) have landed
    __syncthreads();   // everyone's have; and every warp is done with the stage the next copies overwrite
    if (step + S - 1 < steps) issue(step + S - 1);
    cp_commit();
    if constexpr (!SH::DIRECT)
      if (step + LA < steps) load_scales(step + LA, sc[u]);

    // The token tiles' loops over a step's groups and blocks unrolled: their few accumulators leave
    // the registers for it, and the address arithmetic of each block then folds into constants.
#pragma unroll kUnroll ? G : 1
    for (int gi = 0; gi < G && step * G + gi < groups; ++gi) {
      const uint8_t* st = smem + (step % S) * L::kStep + gi * L::kStage;
      const uint8_t* xs = st + L::kXAt;
      // the weights' scales [TM][KB] (DIRECT: f16 bits in the stage), x's [KB][TN], the starts [KB][TN]
      const float* wd = scales + (step & 1) * G * slot_floats + gi * slot_floats;
      const uint16_t* wh = reinterpret_cast<const uint16_t*>(st + L::kWsAt);
      const float* xd = SH::DIRECT ? reinterpret_cast<const float*>(st + L::kXdAt) : wd + TM * KB;
      const int32_t* xz = reinterpret_cast<const int32_t*>(xd + TN * KB);
      const auto w_scale = [&](int row, int kk) { return SH::DIRECT ? f16(wh[row * KB + kk]) : wd[row * KB + kk]; };
#pragma unroll kUnroll ? KB : 1  // the prompt tile one block at a time: unrolled, its blocks' registers spill (measured slower)
      for (int kk = 0; kk < KB; ++kk) {
        int2 z[J];  // the integer sums' start, per token of the thread
#pragma unroll
        for (int j = 0; j < J; ++j)
          z[j] = zero != 0 ? *reinterpret_cast<const int2*>(xz + kk * TN + tok0 + j * 8 + 2 * tig) : make_int2(0, 0);
        int iacc[I][J][4];
#pragma unroll
        for (int s = 0; s < B / 32; ++s) {
          const int ks = kk * B + 32 * s;
          uint32_t b[J][2];
          q8_b_frags<J>(b, xs, tok0, ks, lane);
#pragma unroll
          for (int i = 0; i < I; ++i) {
            const int row = row0 + i * 16 + g;
            const uint8_t* w0 = st + row * L::kCodesLd;
            const uint8_t* h0 = st + L::kW + row * L::kHighLd;
            uint32_t a[4];
            q8_a_frag<DT, B>(a, w0, h0, L::kCodesLd, L::kHighLd, kk, s, tig);
#pragma unroll
            for (int j = 0; j < J; ++j) {
              if (s == 0) mma_i8<DT>(iacc[i][j], a, b[j], z[j].x, z[j].y);
              else mma_i8<DT>(iacc[i][j], a, b[j]);
            }
          }
        }
        // c[0], c[1]: row g, tokens 2 tig, 2 tig + 1; c[2], c[3]: row g + 8
#pragma unroll
        for (int i = 0; i < I; ++i) {
          const float d0 = w_scale(row0 + i * 16 + g, kk), d1 = w_scale(row0 + i * 16 + g + 8, kk);
#pragma unroll
          for (int j = 0; j < J; ++j) {
            const float2 xs = *reinterpret_cast<const float2*>(xd + kk * TN + tok0 + j * 8 + 2 * tig);
            const float x0 = xs.x, x1 = xs.y;
            acc[i][j][0] += d0 * x0 * to_float<zero>(iacc[i][j][0]);
            acc[i][j][1] += d0 * x1 * to_float<zero>(iacc[i][j][1]);
            acc[i][j][2] += d1 * x0 * to_float<zero>(iacc[i][j][2]);
            acc[i][j][3] += d1 * x1 * to_float<zero>(iacc[i][j][3]);
          }
        }
      }
    }
    if constexpr (!SH::DIRECT)
      if (step + 1 < steps) store_scales(step + 1, sc[(u + 1) % LA]);
  }
  cp_wait<0>();
  __syncthreads();  // the output tile reuses the stages
  constexpr int ld = TM + 4;
#pragma unroll
  for (int i = 0; i < I; ++i)
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int row = row0 + i * 16 + g, tok = tok0 + j * 8 + 2 * tig;
      cs[tok * ld + row] = acc[i][j][0];
      cs[(tok + 1) * ld + row] = acc[i][j][1];
      cs[tok * ld + row + 8] = acc[i][j][2];
      cs[(tok + 1) * ld + row + 8] = acc[i][j][3];
    }
  __syncthreads();
  store_tile<TM, TN, SH::THREADS>(m, x, y, ldy, cs, r0, t0, n);
}

using MatmulKernel = void (*)(MatView, const float*, float*, int, int, const int32_t*);
using MatmulQ8Kernel = void (*)(MatView, const float*, const int8_t*, const float*, const int32_t*, float*, int, int,
                                const int32_t*);

MatmulKernel pick(const Weight& w) {
  switch (w.dtype) {
    case UPG_DTYPE_F32: return k_matmul<UPG_DTYPE_F32>;
    case UPG_DTYPE_F16: return k_matmul<UPG_DTYPE_F16>;
    default: return k_matmul<UPG_DTYPE_BF16>;
  }
}

struct Q8Kernel {
  MatmulQ8Kernel kernel;
  size_t smem;
  int tm, tn, threads;  // the tile
};
template <int DT, int B, typename SH>
Q8Kernel q8_kernel() { return {k_matmul_q8<DT, B, SH>, Q8Tile<DT, B, SH>::kSmem, SH::TM, SH::TN, SH::THREADS}; }

template <typename SH>
Q8Kernel pick_q8(int dtype, int block) {
  switch (dtype) {
    case UPG_DTYPE_Q8_0: return block == 32 ? q8_kernel<UPG_DTYPE_Q8_0, 32, SH>() : q8_kernel<UPG_DTYPE_Q8_0, 64, SH>();
    case UPG_DTYPE_Q4: return block == 32 ? q8_kernel<UPG_DTYPE_Q4, 32, SH>() : q8_kernel<UPG_DTYPE_Q4, 64, SH>();
    case UPG_DTYPE_Q3: return block == 32 ? q8_kernel<UPG_DTYPE_Q3, 32, SH>() : q8_kernel<UPG_DTYPE_Q3, 64, SH>();
    case UPG_DTYPE_IQ4_NL: return q8_kernel<UPG_DTYPE_IQ4_NL, 32, SH>();  // the grid types: block 32 (check_weight)
    default:
      if constexpr (SH::DIRECT) throw std::logic_error("cuda matmul: the super-block types have no DIRECT tile");
      else return dtype == UPG_DTYPE_IQ4_XS ? q8_kernel<UPG_DTYPE_IQ4_XS, 32, SH>() : q8_kernel<UPG_DTYPE_IQ3, 32, SH>();
  }
}

// Whether a matrix's scales can be copied by cp.async with its codes (the DIRECT tiles).
bool direct_scales(int dtype, int cols) { return !has_super_block(DType(dtype)) && cols % kQk == 0; }

// The tile for a launch of up to `cap` tokens: 8 and 32-token tiles for a step's generated tokens
// (two 32-token tiles up to 64), the prompt tile beyond. Any tile gives the same bits.
Q8Kernel pick_q8(int dtype, int block, int cap, bool direct) {
  if (cap <= 8) return direct ? pick_q8<Tokens8Direct>(dtype, block) : pick_q8<Tokens8Tile>(dtype, block);
  if (cap <= 64) return direct ? pick_q8<Tokens32Direct>(dtype, block) : pick_q8<Tokens32Tile>(dtype, block);
  return pick_q8<PromptTile>(dtype, block);
}

size_t codes_bytes(const Weight& w) { return (size_t(w.args.n_tokens) * w.args.cols + 15) / 16 * 16; }

}  // namespace

size_t matmul_scratch(const Weight& w) {
  if (!is_quantized(DType(w.dtype))) return 0;
  return codes_bytes(w) + size_t(scales_ld(w.args.n_tokens)) * (w.args.cols / w.args.block) * (sizeof(float) + sizeof(int32_t));
}

void init_matmul() {
  for (int dt : {UPG_DTYPE_Q8_0, UPG_DTYPE_Q4, UPG_DTYPE_Q3, UPG_DTYPE_IQ4_NL, UPG_DTYPE_IQ4_XS, UPG_DTYPE_IQ3})
    for (int b : {32, 64})  // grid types: 32 twice
      for (int cap : {1, 64, 65})
        for (bool direct : {false, true})
          if (!direct || !has_super_block(DType(dt))) allow_max_smem(reinterpret_cast<const void*>(pick_q8(dt, b, cap, direct).kernel));
}

void matmul(const Weight& w, const float* x, float* y, const int32_t* pass, cudaStream_t s, void* scratch) {
  check_weight(w, "matmul");
  if (w.args.n_tokens < 1 || w.args.ldy < w.args.rows) throw std::invalid_argument("cuda matmul: bad n_tokens or ldy");
  if (!is_quantized(DType(w.dtype))) {
    const dim3 grid((w.args.rows + kTm - 1) / kTm, (w.args.n_tokens + kTn - 1) / kTn);
    launch("matmul", pick(w), grid, kThreads, kSmem, s, view(w), x, y, w.args.ldy, w.args.n_tokens, pass);
    return;
  }
  if ((reinterpret_cast<uintptr_t>(w.data) & 15) != 0)
    throw std::invalid_argument("cuda matmul: quantized weights must be 16-byte aligned");
  if (scratch == nullptr || (reinterpret_cast<uintptr_t>(scratch) & 15) != 0)
    throw std::invalid_argument("cuda matmul: quantized weights need 16-byte aligned scratch of matmul_scratch(w) bytes");
  int8_t* xq = static_cast<int8_t*>(scratch);
  const int B = w.args.block, nb = w.args.cols / B;
  float* xd = reinterpret_cast<float*>(xq + codes_bytes(w));
  int32_t* xz = reinterpret_cast<int32_t*>(xd + size_t(scales_ld(w.args.n_tokens)) * nb);
  const int zero = zero_point(DType(w.dtype));
  const dim3 qgrid((nb + 7) / 8, scales_ld(w.args.n_tokens));
  if (B == 32) launch("matmul: round x", k_quantize_x<32>, qgrid, 256, 0, s, x, w.args.cols, w.args.n_tokens, zero, xq, xd, xz, pass);
  else launch("matmul: round x", k_quantize_x<64>, qgrid, 256, 0, s, x, w.args.cols, w.args.n_tokens, zero, xq, xd, xz, pass);
  const Q8Kernel k = pick_q8(w.dtype, B, w.args.n_tokens, direct_scales(w.dtype, w.args.cols));
  const dim3 grid((w.args.n_tokens + k.tn - 1) / k.tn, (w.args.rows + k.tm - 1) / k.tm);
  launch("matmul", k.kernel, grid, k.threads, k.smem, s, view(w), x, static_cast<const int8_t*>(xq),
         static_cast<const float*>(xd), static_cast<const int32_t*>(xz), y, w.args.ldy, w.args.n_tokens, pass);
}

}  // namespace upg::cuda
