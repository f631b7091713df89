// Attention over one layer's KV cache [n_kv_heads][kv_stride][head_dim] (f16 or f32), GQA (query
// head h reads KV head h / (n_heads / n_kv_heads)). kv_store appends the pass's K and V rows;
// decode is flash-decoding (splits of the positions, one block per (KV head, split) serving the
// whole query group, then a combine); prefill is a flash attention, on the tensor cores for an f16
// cache of head_dim 64, 96 or 128, else on CUDA cores (key tiles in shared memory, online softmax
// per query). head_dim: a multiple of 8, at most 256.
#include <algorithm>
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 8;      // query heads per KV head, decode
constexpr int kDecThreads = 128;
constexpr int kSplitLen = 64;     // positions per decode split
constexpr int kPreThreads = 128;  // 4 warps x 4 queries
constexpr int kPreQ = 16;         // queries per prefill block
constexpr int kPreK = 32;         // keys per tile (one per lane)

template <typename KV> __device__ __forceinline__ float kv_f(KV v);
template <> __device__ __forceinline__ float kv_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float kv_f<__half>(__half v) { return __half2float(v); }
template <typename KV> __device__ __forceinline__ KV to_kv(float v);
template <> __device__ __forceinline__ float to_kv<float>(float v) { return v; }
template <> __device__ __forceinline__ __half to_kv<__half>(float v) { return __float2half_rn(v); }

// 16 bytes of a KV row as floats (8 halves or 4 floats; VEC = 16 / sizeof(KV)).
template <typename KV>
__device__ __forceinline__ void load16(const KV* p, float* out) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  if constexpr (sizeof(KV) == 2) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
    const float* f = reinterpret_cast<const float*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = f[i];
  }
}

template <typename KV>
__global__ void k_kv_store(const float* __restrict__ qkv, KV* __restrict__ kc, KV* __restrict__ vc, UpgAttnArgs a,
                           const int32_t* __restrict__ pass) {
  pdl_enter();
  const int d = blockIdx.x * blockDim.x + threadIdx.x, kvh = blockIdx.y, t = blockIdx.z;
  if (d >= a.head_dim || t >= n_tokens(pass)) return;
  const UpgToken& tok = pass_token(pass, t);
  const int pos = tok.kv_base + tok.pos;  // in its sequence's slot
  if (pos >= a.kv_stride) return;
  const float* row = qkv + int64_t(t) * a.q_stride;
  const int64_t dst = (int64_t(kvh) * a.kv_stride + pos) * a.head_dim + d;
  kc[dst] = to_kv<KV>(row[(a.n_heads + kvh) * a.head_dim + d]);
  vc[dst] = to_kv<KV>(row[(a.n_heads + a.n_kv_heads + kvh) * a.head_dim + d]);
}

// One (KV head, split of kSplitLen positions), all G query heads of the group:
// 1. scores into shared memory: a quarter-warp (8 lanes) per position, 4 positions per warp
//    step, STEPS steps' 16-byte K loads issued before the first use (consecutive positions are
//    consecutive rows: the warp reads whole rows); lane-group sums by shuffles;
// 2. softmax pieces per head (max, exp, sum), a warp per head;
// 3. P V: thread = (16-byte column unit, position group), the V loads of 4 positions in flight,
//    then the position groups summed through shared memory.
// Writes the split's unnormalized output, max and sum: acc [n_heads][max_splits][hd], then
// ml [n_heads][max_splits][2], in generated token t's region of the workspace (grid z: the pass's
// generated tokens [0, n_decode), each over its own sequence's positions: its UpgToken).
template <typename KV, int NVL>
__global__ void __launch_bounds__(kDecThreads) k_attn_decode(const float* __restrict__ qkv, const KV* __restrict__ kc,
                                                             const KV* __restrict__ vc, float* __restrict__ ws,
                                                             UpgAttnArgs a, int max_splits,
                                                             const int32_t* __restrict__ pass) {
  constexpr int VEC = 16 / sizeof(KV), STEPS = 8 / NVL;
  pdl_enter();
  const int kvh = blockIdx.x, split = blockIdx.y, t = blockIdx.z, hd = a.head_dim, G = a.n_heads / a.n_kv_heads;
  const int nvec = hd / VEC;
  const UpgToken& tok = pass_token(pass, t);
  const int n_kv = tok.pos + 1;
  const int p0 = split * kSplitLen, len = min(n_kv - p0, kSplitLen);
  if (len <= 0) return;
  ws += int64_t(t) * a.n_heads * max_splits * (hd + 2);
  extern __shared__ float sm[];
  float* qs = sm;                   // [G][hd], scaled
  float* sc = qs + G * hd;          // [G][kSplitLen]
  float* red = sc + G * kSplitLen;  // [npg][G][hd]
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) qs[i] = qkv[int64_t(t) * a.q_stride + kvh * G * hd + i] * a.scale;
  __syncthreads();
  const KV* kbase = kc + (int64_t(kvh) * a.kv_stride + tok.kv_base + p0) * hd;
  const KV* vbase = vc + (int64_t(kvh) * a.kv_stride + tok.kv_base + p0) * hd;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, l8 = lane & 7, sub = lane >> 3;

  for (int pb = warp * 4 * STEPS; pb < len; pb += (kDecThreads / 32) * 4 * STEPS) {
    uint4 raw[STEPS][NVL];
#pragma unroll
    for (int st = 0; st < STEPS; ++st)
#pragma unroll
      for (int i = 0; i < NVL; ++i) {
        const int p = pb + 4 * st + sub, v = l8 + 8 * i;
        raw[st][i] = p < len && v < nvec ? __ldg(reinterpret_cast<const uint4*>(kbase + int64_t(p) * hd + v * VEC))
                                         : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int st = 0; st < STEPS; ++st) {
      float s[kMaxGroup];
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) s[g] = 0.0f;
#pragma unroll
      for (int i = 0; i < NVL; ++i) {
        const int v = l8 + 8 * i;
        if (v >= nvec) continue;
        float kf[VEC];
        load16<KV>(reinterpret_cast<const KV*>(&raw[st][i]), kf);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < G)
#pragma unroll
            for (int j = 0; j < VEC; ++j) s[g] += kf[j] * qs[g * hd + v * VEC + j];
      }
      const int p = pb + 4 * st + sub;
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= G) break;  // uniform over the warp
        float t = s[g];
        t += __shfl_xor_sync(0xffffffffu, t, 1);
        t += __shfl_xor_sync(0xffffffffu, t, 2);
        t += __shfl_xor_sync(0xffffffffu, t, 4);
        if (l8 == 0 && p < len) sc[g * kSplitLen + p] = t;
      }
    }
  }
  __syncthreads();
  __shared__ float mx[kMaxGroup], sum[kMaxGroup];
  for (int g = warp; g < G; g += kDecThreads / 32) {
    float m = -INFINITY;
    for (int p = lane; p < len; p += 32) m = fmaxf(m, sc[g * kSplitLen + p]);
    m = warp_max(m);
    float l = 0.0f;
    for (int p = lane; p < len; p += 32) {
      const float e = __expf(sc[g * kSplitLen + p] - m);
      sc[g * kSplitLen + p] = e;
      l += e;
    }
    l = warp_sum(l);
    if (lane == 0) {
      mx[g] = m;
      sum[g] = l;
    }
  }
  __syncthreads();
  const int npg = kDecThreads / nvec, cu = threadIdx.x % nvec, pg = threadIdx.x / nvec;
  if (pg < npg) {
    float acc[kMaxGroup][VEC];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    for (int pb = pg; pb < len; pb += 4 * npg) {
      uint4 raw[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int p = pb + j * npg;
        raw[j] = p < len ? __ldg(reinterpret_cast<const uint4*>(vbase + int64_t(p) * hd + cu * VEC)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int p = pb + j * npg;
        if (p >= len) break;
        float v[VEC];
        load16<KV>(reinterpret_cast<const KV*>(&raw[j]), v);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g)
          if (g < G) {
            const float e = sc[g * kSplitLen + p];
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[g][i] += e * v[i];
          }
      }
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
      if (g < G)
#pragma unroll
        for (int i = 0; i < VEC; ++i) red[(pg * G + g) * hd + cu * VEC + i] = acc[g][i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
    const int g = i / hd, d = i % hd;
    float s = 0.0f;
    for (int q = 0; q < npg; ++q) s += red[(q * G + g) * hd + d];
    ws[(int64_t(kvh * G + g) * max_splits + split) * hd + d] = s;
  }
  if (threadIdx.x < G) {
    float* ml = ws + int64_t(a.n_heads) * max_splits * hd;
    const int64_t slot = int64_t(kvh * G + threadIdx.x) * max_splits + split;
    ml[2 * slot] = mx[threadIdx.x];
    ml[2 * slot + 1] = sum[threadIdx.x];
  }
}

// out[t][h][d] = sum_s e^(m_s - M) acc_s[d] / sum_s e^(m_s - M) l_s over the active splits of
// generated token t. One block per (head, token): the splits' (m, l) go to shared memory in one parallel load, the weights
// e^(m_s - M) / L are formed there, then thread (4-dim column, split group) sums its splits with
// four loads in flight and the split groups meet in shared memory.
constexpr int kCombineThreads = 256;

__global__ void __launch_bounds__(kCombineThreads) k_attn_combine(const float* __restrict__ ws, float* __restrict__ out,
                                                                 UpgAttnArgs a, int max_splits,
                                                                 const int32_t* __restrict__ pass) {
  pdl_enter();
  extern __shared__ float cm[];  // [max_splits] weights (padded to 4), then [kCombineThreads * 4] partial sums
  __shared__ float red[kCombineThreads / 32];
  const int h = blockIdx.x, t = blockIdx.y, hd = a.head_dim, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_kv = pass_token(pass, t).pos + 1;
  const int ns = min(max_splits, (n_kv + kSplitLen - 1) / kSplitLen);
  ws += int64_t(t) * a.n_heads * max_splits * (hd + 2);
  out += int64_t(t) * a.n_heads * hd;
  const float* ml = ws + int64_t(a.n_heads) * max_splits * hd + int64_t(h) * max_splits * 2;
  float m = -INFINITY;
  for (int s = threadIdx.x; s < ns; s += blockDim.x) {
    cm[s] = ml[2 * s];
    m = fmaxf(m, cm[s]);
  }
  m = warp_max(m);
  if (lane == 0) red[warp] = m;
  __syncthreads();
  float M = red[0];
  for (int i = 1; i < kCombineThreads / 32; ++i) M = fmaxf(M, red[i]);
  __syncthreads();
  float l = 0.0f;
  for (int s = threadIdx.x; s < ns; s += blockDim.x) {
    cm[s] = __expf(cm[s] - M);
    l += cm[s] * ml[2 * s + 1];
  }
  l = warp_sum(l);
  if (lane == 0) red[warp] = l;
  __syncthreads();
  float L = 0.0f;
  for (int i = 0; i < kCombineThreads / 32; ++i) L += red[i];
  const int cols = hd / 4, groups = kCombineThreads / cols, c = threadIdx.x % cols, g = threadIdx.x / cols;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (g < groups) {
    const float4* base = reinterpret_cast<const float4*>(ws + int64_t(h) * max_splits * hd) + c;
    for (int s0 = g; s0 < ns; s0 += 4 * groups) {
      float4 v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int s = s0 + j * groups;
        v[j] = s < ns ? base[int64_t(s) * cols] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int s = s0 + j * groups;
        const float w = s < ns ? cm[s] : 0.0f;
        acc.x += w * v[j].x;
        acc.y += w * v[j].y;
        acc.z += w * v[j].z;
        acc.w += w * v[j].w;
      }
    }
  }
  float* part = cm + (max_splits + 3) / 4 * 4;
  reinterpret_cast<float4*>(part)[threadIdx.x] = acc;
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int q = 0; q < groups; ++q) v += part[(q * cols + d / 4) * 4 + d % 4];
    out[h * hd + d] = v / L;
  }
}

// Tile `tile` of the pass's prompt tokens at Q queries a tile: each prompt sequence (those past
// the generated tokens, UpgPass::n_decode) has its own tiles, in order, so a tile never mixes
// sequences and a sequence's tiles are the same whatever else the pass holds. n = 0 past the last.
struct PromptTile {
  int first, n, past, kv_base, t0;  // the sequence's first token, tokens, n_past, slot; the tile's first query
};

__device__ __forceinline__ PromptTile prompt_tile(const int32_t* pass, int tile, int Q) {
  const UpgPass& p = *reinterpret_cast<const UpgPass*>(pass);
  for (int s = 0; s < p.n_seqs; ++s) {
    const UpgSeq& q = pass_seq(pass, s);
    if (q.first < p.n_decode) continue;
    const int nt = (q.n_tokens + Q - 1) / Q;
    if (tile < nt) return {q.first, q.n_tokens, q.n_past, q.kv_base, tile * Q};
    tile -= nt;
  }
  return {0, 0, 0, 0, 0};
}

// Tiles of the prompt tokens for the grid: sum over k prompt sequences of ceil(n_s / Q) is at
// most ceil(n_prompt / Q) + k - 1 (blocks past the last tile exit).
int prompt_tiles(const UpgAttnArgs& a, int Q) { return (a.n_tokens - a.n_decode + Q - 1) / Q + a.n_seqs - 1; }

// Prefill: block (query head, tile of 16 queries of one sequence); warp w owns queries 4w..4w+3 of the block, lane j the
// key j of each 32-key tile and the dims j, j + 32, ... of the outputs.
template <typename KV>
__global__ void __launch_bounds__(kPreThreads) k_attn_prefill(const float* __restrict__ qkv, const KV* __restrict__ kc,
                                                              const KV* __restrict__ vc, float* __restrict__ out,
                                                              UpgAttnArgs a, const int32_t* __restrict__ pass) {
  pdl_enter();
  const PromptTile pt = prompt_tile(pass, blockIdx.y, kPreQ);
  const int h = blockIdx.x, t0 = pt.t0, hd = a.head_dim, n = pt.n, past = pt.past;
  if (t0 >= n) return;
  qkv += int64_t(pt.first) * a.q_stride;  // the sequence's rows
  out += int64_t(pt.first) * a.n_heads * hd;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  extern __shared__ float sm[];
  float* ks = sm;                      // [kPreK][hd + 1]
  float* vs = ks + kPreK * (hd + 1);   // [kPreK][hd]
  float* qs = vs + kPreK * hd;         // [kPreQ][hd]
  for (int i = threadIdx.x; i < kPreQ * hd; i += blockDim.x) {
    const int q = i / hd, t = min(t0 + q, n - 1);
    qs[i] = qkv[int64_t(t) * a.q_stride + h * hd + i % hd] * a.scale;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int QW = kPreQ / (kPreThreads / 32), ND = kMaxHeadDim / 32;
  float m[QW], l[QW], acc[QW][ND];
#pragma unroll
  for (int q = 0; q < QW; ++q) {
    m[q] = -INFINITY;
    l[q] = 0.0f;
#pragma unroll
    for (int i = 0; i < ND; ++i) acc[q][i] = 0.0f;
  }
  const KV* kbase = kc + (int64_t(kvh) * a.kv_stride + pt.kv_base) * hd;
  const KV* vbase = vc + (int64_t(kvh) * a.kv_stride + pt.kv_base) * hd;
  const int last = past + min(t0 + kPreQ, n);  // keys [0, last)
  for (int j0 = 0; j0 < last; j0 += kPreK) {
    __syncthreads();
    for (int i = threadIdx.x; i < kPreK * hd; i += blockDim.x) {
      const int j = i / hd, d = i % hd, p = j0 + j;
      const bool ok = p < last;
      ks[j * (hd + 1) + d] = ok ? kv_f<KV>(kbase[int64_t(p) * hd + d]) : 0.0f;
      vs[j * hd + d] = ok ? kv_f<KV>(vbase[int64_t(p) * hd + d]) : 0.0f;
    }
    __syncthreads();
    float s[QW];
#pragma unroll
    for (int q = 0; q < QW; ++q) s[q] = 0.0f;
    for (int d = 0; d < hd; ++d) {
      const float k = ks[lane * (hd + 1) + d];
#pragma unroll
      for (int q = 0; q < QW; ++q) s[q] += qs[(warp * QW + q) * hd + d] * k;
    }
    const int p = j0 + lane;
#pragma unroll
    for (int q = 0; q < QW; ++q) {
      const int t = t0 + warp * QW + q;
      if (p > past + t) s[q] = -INFINITY;  // causal (and past the tile's end)
      const float m_new = fmaxf(m[q], warp_max(s[q]));
      const float c = __expf(m[q] - m_new), e = __expf(s[q] - m_new);
      l[q] = l[q] * c + warp_sum(e);
      m[q] = m_new;
#pragma unroll
      for (int i = 0; i < ND; ++i) acc[q][i] *= c;
      for (int j = 0; j < kPreK; ++j) {
        const float ej = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
        for (int i = 0; i < ND; ++i)
          if (i * 32 + lane < hd) acc[q][i] += ej * vs[j * hd + i * 32 + lane];
      }
    }
  }
#pragma unroll
  for (int q = 0; q < QW; ++q) {
    const int t = t0 + warp * QW + q;
    if (t >= n) continue;
#pragma unroll
    for (int i = 0; i < ND; ++i)
      if (i * 32 + lane < hd) out[(int64_t(t) * a.n_heads + h) * hd + i * 32 + lane] = acc[q][i] / l[q];
  }
}

// Prefill on the tensor cores (f16 cache, head_dim 64, 96 or 128), flash-attention style: block
// (query head, 64 queries), warp w the queries 16w..16w + 15 of the block; 64-key tiles of K and V
// in shared memory by cp.async, two stages, one barrier per tile. S = Q K^T on mma.m16n8k16 (Q
// rounded to f16 once, K as cached), f32 scores, causal mask and online softmax in f32 (exp2 of
// the scores times scale * log2 e), P rounded to f16 for O += P V (V as cached), f32 accumulators.
// K's B fragments come by ldmatrix, V's by ldmatrix.trans; P goes from the score accumulators to
// the A fragments in registers.
constexpr int kFaQ = 64, kFaK = 64, kFaThreads = 128;

template <int HD>
struct FaTile {
  static constexpr int kLd = HD + 8;           // halves per shared row: ldmatrix's 8 rows on distinct bank groups
  static constexpr int kTile = kFaK * kLd;      // halves of one K or V tile
  static constexpr size_t kSmem = size_t(4) * kTile * sizeof(__half);  // K and V, two stages
};

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int HD>
__global__ void __launch_bounds__(kFaThreads) k_attn_prefill_mma(const float* __restrict__ qkv, const __half* __restrict__ kc,
                                                                 const __half* __restrict__ vc, float* __restrict__ out,
                                                                 UpgAttnArgs a, const int32_t* __restrict__ pass) {
  using L = FaTile<HD>;
  pdl_enter();
  const PromptTile pt = prompt_tile(pass, blockIdx.y, kFaQ);
  const int h = blockIdx.x, t0 = pt.t0, n = pt.n, past = pt.past;
  if (t0 >= n) return;
  qkv += int64_t(pt.first) * a.q_stride;  // the sequence's rows
  out += int64_t(pt.first) * a.n_heads * HD;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  extern __shared__ __align__(16) uint8_t fa_smem[];
  __half* sm = reinterpret_cast<__half*>(fa_smem);  // [stage][K, V][kFaK][kLd]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tig = lane & 3, mq = lane >> 3;
  const __half* kbase = kc + (int64_t(kvh) * a.kv_stride + pt.kv_base) * HD;
  const __half* vbase = vc + (int64_t(kvh) * a.kv_stride + pt.kv_base) * HD;
  const int last = past + min(t0 + kFaQ, n);  // the block attends keys [0, last)
  const int tiles = (last + kFaK - 1) / kFaK;

  // K and V rows of a tile, 16-byte chunks; keys at or past `last` are zero-filled
  auto issue = [&](int tile, int stage) {
    __half* ks = sm + stage * 2 * L::kTile;
    constexpr int CH = HD / 8;
#pragma unroll
    for (int q = 0; q < kFaK * CH / kFaThreads; ++q) {
      const int e = threadIdx.x + kFaThreads * q, j = e / CH, c = e % CH, p = tile * kFaK + j;
      const bool ok = p < last;
      const int64_t off = ok ? int64_t(p) * HD + c * 8 : 0;
      cp_async<16>(ks + j * L::kLd + c * 8, kbase + off, ok);
      cp_async<16>(ks + L::kTile + j * L::kLd + c * 8, vbase + off, ok);
    }
  };
  issue(0, 0);
  cp_commit();

  // The warp's Q rows g and g + 8 as A fragments (rows past the pass are zeros).
  const int tq0 = t0 + warp * 16 + g, tq1 = tq0 + 8;
  uint32_t qf[HD / 16][4];
  {
    const float* q0 = qkv + int64_t(tq0) * a.q_stride + h * HD;
    const float* q1 = qkv + int64_t(tq1) * a.q_stride + h * HD;
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc) {
      const int d = kc * 16 + 2 * tig;
      const float2 z = make_float2(0.0f, 0.0f);
      const float2 v00 = tq0 < n ? *reinterpret_cast<const float2*>(q0 + d) : z;
      const float2 v01 = tq0 < n ? *reinterpret_cast<const float2*>(q0 + d + 8) : z;
      const float2 v10 = tq1 < n ? *reinterpret_cast<const float2*>(q1 + d) : z;
      const float2 v11 = tq1 < n ? *reinterpret_cast<const float2*>(q1 + d + 8) : z;
      qf[kc][0] = pack_half2(v00.x, v00.y);
      qf[kc][1] = pack_half2(v10.x, v10.y);
      qf[kc][2] = pack_half2(v01.x, v01.y);
      qf[kc][3] = pack_half2(v11.x, v11.y);
    }
  }

  float o[HD / 8][4] = {};
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g, g + 8; l: this thread's part
  const float sl2 = a.scale * 1.4426950408889634f;
  const int warp_last = past + t0 + warp * 16 + 15;  // the warp's last key
  for (int tile = 0; tile < tiles; ++tile) {
    cp_wait<0>();
    __syncthreads();  // the tile is in; every warp is done with the stage the next copies overwrite
    if (tile + 1 < tiles) issue(tile + 1, (tile + 1) & 1);
    cp_commit();
    const int j0 = tile * kFaK;
    if (j0 > warp_last) continue;  // causal: nothing of this tile for the warp's queries
    const __half* ks = sm + (tile & 1) * 2 * L::kTile;
    const __half* vs = ks + L::kTile;

    float s[kFaK / 8][4] = {};
#pragma unroll
    for (int kc = 0; kc < HD / 16; ++kc)
#pragma unroll
      for (int np = 0; np < kFaK / 16; ++np) {  // matrix mq: keys np * 16 + (mq / 2) * 8.., dims kc * 16 + (mq % 2) * 8..
        uint32_t r[4];
        ldmatrix_x4(r, ks + (np * 16 + (mq >> 1) * 8 + (lane & 7)) * L::kLd + kc * 16 + (mq & 1) * 8);
        mma_f16(s[2 * np], qf[kc], r[0], r[1]);
        mma_f16(s[2 * np + 1], qf[kc], r[2], r[3]);
      }
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < kFaK / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int key = j0 + nt * 8 + 2 * tig + e;
        s[nt][e] = key <= past + tq0 ? s[nt][e] * sl2 : -INFINITY;
        s[nt][2 + e] = key <= past + tq1 ? s[nt][2 + e] * sl2 : -INFINITY;
        mx0 = fmaxf(mx0, s[nt][e]);
        mx1 = fmaxf(mx1, s[nt][2 + e]);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // key 0 is in every row's range, so the maxima are finite from the first tile on
    const float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);
    m0 = mx0;
    m1 = mx1;
    l0 *= c0;
    l1 *= c1;
#pragma unroll
    for (int dn = 0; dn < HD / 8; ++dn) {
      o[dn][0] *= c0;
      o[dn][1] *= c0;
      o[dn][2] *= c1;
      o[dn][3] *= c1;
    }
    uint32_t pf[kFaK / 16][4];  // P as the A fragments of 16 keys each
#pragma unroll
    for (int nt = 0; nt < kFaK / 8; ++nt) {
      const float p0 = exp2f(s[nt][0] - m0), p1 = exp2f(s[nt][1] - m0);
      const float p2 = exp2f(s[nt][2] - m1), p3 = exp2f(s[nt][3] - m1);
      l0 += p0 + p1;
      l1 += p2 + p3;
      pf[nt / 2][(nt & 1) * 2] = pack_half2(p0, p1);
      pf[nt / 2][(nt & 1) * 2 + 1] = pack_half2(p2, p3);
    }
#pragma unroll
    for (int kk = 0; kk < kFaK / 16; ++kk)
#pragma unroll
      for (int dp = 0; dp < HD / 16; ++dp) {  // matrix mq: keys kk * 16 + (mq % 2) * 8.., dims (2 dp + mq / 2) * 8..
        uint32_t r[4];
        ldmatrix_x4_trans(r, vs + (kk * 16 + (mq & 1) * 8 + (lane & 7)) * L::kLd + (2 * dp + (mq >> 1)) * 8);
        mma_f16(o[2 * dp], pf[kk], r[0], r[1]);
        mma_f16(o[2 * dp + 1], pf[kk], r[2], r[3]);
      }
  }
  cp_wait<0>();
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#pragma unroll
  for (int dn = 0; dn < HD / 8; ++dn) {
    const int d = dn * 8 + 2 * tig;
    if (tq0 < n) *reinterpret_cast<float2*>(out + (int64_t(tq0) * a.n_heads + h) * HD + d) = make_float2(o[dn][0] / l0, o[dn][1] / l0);
    if (tq1 < n) *reinterpret_cast<float2*>(out + (int64_t(tq1) * a.n_heads + h) * HD + d) = make_float2(o[dn][2] / l1, o[dn][3] / l1);
  }
}

void check_attn(const UpgAttnArgs& a, const char* what) {
  if (a.head_dim < 8 || a.head_dim % 8 != 0 || a.head_dim > kMaxHeadDim || a.n_kv_heads < 1 ||
      a.n_heads % a.n_kv_heads != 0 || a.kv_stride < 1 || a.n_tokens < 1 || a.slot_len < 1 || a.n_seqs < 1 ||
      a.n_seqs > a.n_tokens || a.n_decode < 0 || a.n_decode > a.n_tokens)
    throw std::invalid_argument(std::string("cuda ") + what + ": bad attention shape");
}

size_t decode_smem(const UpgAttnArgs& a, bool f16) {
  const int G = a.n_heads / a.n_kv_heads, npg = kDecThreads / (a.head_dim / (f16 ? 8 : 4));
  return size_t(G * a.head_dim + G * kSplitLen + npg * G * a.head_dim) * 4;
}

// 16-byte K vectors per lane of a quarter-warp: 1, 2, 4 or 8.
int decode_nvl(const UpgAttnArgs& a, bool f16) {
  const int per_lane = (a.head_dim / (f16 ? 8 : 4) + 7) / 8;
  return per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : 8;
}

template <typename KV>
void launch_decode(int nvl, dim3 grid, size_t smem, cudaStream_t s, const float* qkv, const void* kc, const void* vc,
                   float* ws, const UpgAttnArgs& a, int max_splits, const int32_t* pass) {
  auto k = k_attn_decode<KV, 1>;
  if (nvl == 2) k = k_attn_decode<KV, 2>;
  if (nvl == 4) k = k_attn_decode<KV, 4>;
  if (nvl == 8) k = k_attn_decode<KV, 8>;
  launch("attention_decode", k, grid, kDecThreads, smem, s, qkv, static_cast<const KV*>(kc), static_cast<const KV*>(vc), ws, a,
         max_splits, pass);
}

size_t prefill_smem(const UpgAttnArgs& a) {
  return size_t(kPreK * (a.head_dim + 1) + kPreK * a.head_dim + kPreQ * a.head_dim) * 4;
}

}  // namespace

void init_attention() {
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<float, 1>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<float, 2>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<float, 4>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<float, 8>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<__half, 1>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<__half, 2>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<__half, 4>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_decode<__half, 8>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_combine));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_prefill<float>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_prefill<__half>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_prefill_mma<64>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_prefill_mma<96>));
  allow_max_smem(reinterpret_cast<const void*>(k_attn_prefill_mma<128>));
}

void kv_store(const float* qkv, void* k_cache, void* v_cache, bool f16, const UpgAttnArgs& a, const int32_t* pass,
              cudaStream_t s) {
  check_attn(a, "kv_store");
  const dim3 grid((a.head_dim + 31) / 32, a.n_kv_heads, a.n_tokens);
  if (f16) launch("kv_store", k_kv_store<__half>, grid, 32, 0, s, qkv, static_cast<__half*>(k_cache), static_cast<__half*>(v_cache), a, pass);
  else launch("kv_store", k_kv_store<float>, grid, 32, 0, s, qkv, static_cast<float*>(k_cache), static_cast<float*>(v_cache), a, pass);
}

DecodeSplits decode_splits(const UpgAttnArgs& a) {
  DecodeSplits d;
  d.split_len = kSplitLen;
  d.max_splits = (std::min(a.slot_len, a.kv_stride) + kSplitLen - 1) / kSplitLen;
  d.workspace = size_t(std::max(a.n_decode, 1)) * a.n_heads * d.max_splits * (a.head_dim + 2) * 4;
  return d;
}

void attention_decode(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                      const UpgAttnArgs& a, float* workspace, const int32_t* pass, cudaStream_t s) {
  check_attn(a, "attention_decode");
  if (a.n_heads / a.n_kv_heads > kMaxGroup) throw std::invalid_argument("cuda attention_decode: GQA group above 8");
  if (a.n_decode < 1 || a.n_decode > a.n_tokens) throw std::invalid_argument("cuda attention_decode: n_decode outside [1, n_tokens]");
  const DecodeSplits d = decode_splits(a);
  const dim3 grid(a.n_kv_heads, d.max_splits, a.n_decode);
  const size_t smem = decode_smem(a, f16);
  const int nvl = decode_nvl(a, f16);
  if (f16) launch_decode<__half>(nvl, grid, smem, s, qkv, k_cache, v_cache, workspace, a, d.max_splits, pass);
  else launch_decode<float>(nvl, grid, smem, s, qkv, k_cache, v_cache, workspace, a, d.max_splits, pass);
  const size_t cmem = size_t((d.max_splits + 3) / 4 * 4 + kCombineThreads * 4) * 4;
  launch("attention_decode combine", k_attn_combine, dim3(a.n_heads, a.n_decode), kCombineThreads, cmem, s, workspace, out, a,
         d.max_splits, pass);
}

void attention_prefill(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                       const UpgAttnArgs& a, const int32_t* pass, cudaStream_t s) {
  check_attn(a, "attention_prefill");
  if (a.n_decode >= a.n_tokens) throw std::invalid_argument("cuda attention_prefill: no prompt tokens (n_decode >= n_tokens)");
  if (f16 && (a.head_dim == 64 || a.head_dim == 96 || a.head_dim == 128)) {
    const dim3 grid(a.n_heads, prompt_tiles(a, kFaQ));
    const __half* k = static_cast<const __half*>(k_cache);
    const __half* v = static_cast<const __half*>(v_cache);
    if (a.head_dim == 64) launch("attention_prefill", k_attn_prefill_mma<64>, grid, kFaThreads, FaTile<64>::kSmem, s, qkv, k, v, out, a, pass);
    else if (a.head_dim == 96) launch("attention_prefill", k_attn_prefill_mma<96>, grid, kFaThreads, FaTile<96>::kSmem, s, qkv, k, v, out, a, pass);
    else launch("attention_prefill", k_attn_prefill_mma<128>, grid, kFaThreads, FaTile<128>::kSmem, s, qkv, k, v, out, a, pass);
    return;
  }
  const dim3 grid(a.n_heads, prompt_tiles(a, kPreQ));
  const size_t smem = prefill_smem(a);
  if (f16)
    launch("attention_prefill", k_attn_prefill<__half>, grid, kPreThreads, smem, s, qkv,
           static_cast<const __half*>(k_cache), static_cast<const __half*>(v_cache), out, a, pass);
  else
    launch("attention_prefill", k_attn_prefill<float>, grid, kPreThreads, smem, s, qkv,
           static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), out, a, pass);
}

}  // namespace upg::cuda
