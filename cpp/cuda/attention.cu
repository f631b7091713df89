// Attention over one layer's KV cache [n_kv_heads][kv_stride][head_dim] (f16 or f32), GQA (query
// head h reads KV head h / (n_heads / n_kv_heads)). kv_store appends the pass's K and V rows;
// decode is flash-decoding (splits of the positions, one block per (KV head, split) serving the
// whole query group, then a combine); prefill is a flash attention on CUDA cores (key tiles in
// shared memory, online softmax per query). head_dim: a multiple of 8, at most 256.
#include <algorithm>
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kMaxHeadDim = 256;
constexpr int kMaxGroup = 8;      // query heads per KV head, decode
constexpr int kDecThreads = 128;
constexpr int kSplitLen = 256;    // positions per decode split
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
  const int d = blockIdx.x * blockDim.x + threadIdx.x, kvh = blockIdx.y, t = blockIdx.z;
  const int pos = n_past(pass) + t;
  if (d >= a.head_dim || t >= n_tokens(pass) || pos >= a.kv_stride) return;
  const float* row = qkv + int64_t(t) * a.q_stride;
  const int64_t dst = (int64_t(kvh) * a.kv_stride + pos) * a.head_dim + d;
  kc[dst] = to_kv<KV>(row[(a.n_heads + kvh) * a.head_dim + d]);
  vc[dst] = to_kv<KV>(row[(a.n_heads + a.n_kv_heads + kvh) * a.head_dim + d]);
}

// One (KV head, split): scores of every query head of the group for the split's positions into
// shared memory (one thread per position, the whole K row with 16-byte loads), softmax per head,
// then P V with threads over 16-byte column units and position groups. Writes the split's
// unnormalized output, max and sum to the workspace: acc [n_heads][max_splits][hd], ml [..][2].
template <typename KV>
__global__ void __launch_bounds__(kDecThreads) k_attn_decode(const float* __restrict__ qkv, const KV* __restrict__ kc,
                                                             const KV* __restrict__ vc, float* __restrict__ ws,
                                                             UpgAttnArgs a, int max_splits,
                                                             const int32_t* __restrict__ pass) {
  constexpr int VEC = 16 / sizeof(KV);
  const int kvh = blockIdx.x, split = blockIdx.y, hd = a.head_dim, G = a.n_heads / a.n_kv_heads;
  const int n_kv = n_past(pass) + n_tokens(pass);
  const int p0 = split * kSplitLen, p1 = min(n_kv, p0 + kSplitLen), len = p1 - p0;
  if (len <= 0) return;
  extern __shared__ float sm[];
  float* qs = sm;                        // [G][hd], scaled
  float* sc = qs + kMaxGroup * hd;       // [G][kSplitLen]
  float* red = sc + kMaxGroup * kSplitLen;  // [npg][G][hd]
  for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
    const int g = i / hd, d = i % hd;
    qs[i] = qkv[(kvh * G + g) * hd + d] * a.scale;
  }
  __syncthreads();
  const KV* kbase = kc + int64_t(kvh) * a.kv_stride * hd;
  const KV* vbase = vc + int64_t(kvh) * a.kv_stride * hd;
  for (int p = threadIdx.x; p < len; p += blockDim.x) {
    float s[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) s[g] = 0.0f;
    const KV* krow = kbase + int64_t(p0 + p) * hd;
    for (int d0 = 0; d0 < hd; d0 += VEC) {
      float kv[VEC];
      load16<KV>(krow + d0, kv);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g)
        if (g < G)
#pragma unroll
          for (int i = 0; i < VEC; ++i) s[g] += kv[i] * qs[g * hd + d0 + i];
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
      if (g < G) sc[g * kSplitLen + p] = s[g];
  }
  __syncthreads();
  // Softmax pieces per head: warp w takes heads w, w + 4, ...
  __shared__ float mx[kMaxGroup], sum[kMaxGroup];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
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
  // P V: thread = (column unit cu, position group pg).
  const int units = hd / VEC, npg = kDecThreads / units;
  const int cu = threadIdx.x % units, pg = threadIdx.x / units;
  if (pg < npg) {
    float acc[kMaxGroup][VEC];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] = 0.0f;
    for (int p = pg; p < len; p += npg) {
      float v[VEC];
      load16<KV>(vbase + int64_t(p0 + p) * hd + cu * VEC, v);
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g)
        if (g < G) {
          const float e = sc[g * kSplitLen + p];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[g][i] += e * v[i];
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
    const int64_t slot = int64_t(kvh * G + g) * max_splits + split;
    ws[slot * hd + d] = s;
  }
  if (threadIdx.x < G) {
    float* ml = ws + int64_t(a.n_heads) * max_splits * hd;
    const int64_t slot = int64_t(kvh * G + threadIdx.x) * max_splits + split;
    ml[2 * slot] = mx[threadIdx.x];
    ml[2 * slot + 1] = sum[threadIdx.x];
  }
}

// out[h][d] = sum_s e^(m_s - M) acc_s[d] / sum_s e^(m_s - M) l_s over the active splits.
__global__ void k_attn_combine(const float* __restrict__ ws, float* __restrict__ out, UpgAttnArgs a, int max_splits,
                               const int32_t* __restrict__ pass) {
  const int h = blockIdx.x, hd = a.head_dim;
  const int n_kv = n_past(pass) + n_tokens(pass);
  const int ns = min(max_splits, (n_kv + kSplitLen - 1) / kSplitLen);
  const float* ml = ws + int64_t(a.n_heads) * max_splits * hd + int64_t(h) * max_splits * 2;
  float M = -INFINITY;
  for (int s = 0; s < ns; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.0f;
  for (int s = 0; s < ns; ++s) L += __expf(ml[2 * s] - M) * ml[2 * s + 1];
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int s = 0; s < ns; ++s) v += __expf(ml[2 * s] - M) * ws[(int64_t(h) * max_splits + s) * hd + d];
    out[h * hd + d] = v / L;
  }
}

// Prefill: block (query head, 16 queries); warp w owns queries 4w..4w+3 of the block, lane j the
// key j of each 32-key tile and the dims j, j + 32, ... of the outputs.
template <typename KV>
__global__ void __launch_bounds__(kPreThreads) k_attn_prefill(const float* __restrict__ qkv, const KV* __restrict__ kc,
                                                              const KV* __restrict__ vc, float* __restrict__ out,
                                                              UpgAttnArgs a, const int32_t* __restrict__ pass) {
  const int h = blockIdx.x, t0 = blockIdx.y * kPreQ, hd = a.head_dim;
  const int n = n_tokens(pass), past = n_past(pass);
  if (t0 >= n) return;
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
  const KV* kbase = kc + int64_t(kvh) * a.kv_stride * hd;
  const KV* vbase = vc + int64_t(kvh) * a.kv_stride * hd;
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

void check_attn(const UpgAttnArgs& a, const char* what) {
  if (a.head_dim < 8 || a.head_dim % 8 != 0 || a.head_dim > kMaxHeadDim || a.n_kv_heads < 1 ||
      a.n_heads % a.n_kv_heads != 0 || a.kv_stride < 1 || a.n_tokens < 1)
    throw std::invalid_argument(std::string("cuda ") + what + ": bad attention shape");
}

size_t decode_smem(const UpgAttnArgs& a, bool f16) {
  const int units = a.head_dim / (f16 ? 8 : 4), npg = kDecThreads / units;
  return size_t(kMaxGroup * a.head_dim + kMaxGroup * kSplitLen + npg * kMaxGroup * a.head_dim) * 4;
}

size_t prefill_smem(const UpgAttnArgs& a) {
  return size_t(kPreK * (a.head_dim + 1) + kPreK * a.head_dim + kPreQ * a.head_dim) * 4;
}

}  // namespace

void init_attention() {
  constexpr int kMax = 227 * 1024;
  check(cudaFuncSetAttribute(k_attn_decode<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMax), "attn smem");
  check(cudaFuncSetAttribute(k_attn_decode<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMax), "attn smem");
  check(cudaFuncSetAttribute(k_attn_prefill<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMax), "attn smem");
  check(cudaFuncSetAttribute(k_attn_prefill<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMax), "attn smem");
}

void kv_store(const float* qkv, void* k_cache, void* v_cache, bool f16, const UpgAttnArgs& a, const int32_t* pass,
              cudaStream_t s) {
  check_attn(a, "kv_store");
  const dim3 grid((a.head_dim + 31) / 32, a.n_kv_heads, a.n_tokens);
  if (f16) k_kv_store<__half><<<grid, 32, 0, s>>>(qkv, static_cast<__half*>(k_cache), static_cast<__half*>(v_cache), a, pass);
  else k_kv_store<float><<<grid, 32, 0, s>>>(qkv, static_cast<float*>(k_cache), static_cast<float*>(v_cache), a, pass);
  check_launch("kv_store");
}

DecodeSplits decode_splits(const UpgAttnArgs& a) {
  DecodeSplits d;
  d.split_len = kSplitLen;
  d.max_splits = (a.kv_stride + kSplitLen - 1) / kSplitLen;
  d.workspace = size_t(a.n_heads) * d.max_splits * (a.head_dim + 2) * 4;
  return d;
}

void attention_decode(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                      const UpgAttnArgs& a, float* workspace, const int32_t* pass, cudaStream_t s) {
  check_attn(a, "attention_decode");
  if (a.n_heads / a.n_kv_heads > kMaxGroup) throw std::invalid_argument("cuda attention_decode: GQA group above 8");
  const DecodeSplits d = decode_splits(a);
  const dim3 grid(a.n_kv_heads, d.max_splits);
  const size_t smem = decode_smem(a, f16);
  if (f16)
    k_attn_decode<__half><<<grid, kDecThreads, smem, s>>>(qkv, static_cast<const __half*>(k_cache),
                                                           static_cast<const __half*>(v_cache), workspace, a, d.max_splits, pass);
  else
    k_attn_decode<float><<<grid, kDecThreads, smem, s>>>(qkv, static_cast<const float*>(k_cache),
                                                          static_cast<const float*>(v_cache), workspace, a, d.max_splits, pass);
  check_launch("attention_decode");
  k_attn_combine<<<a.n_heads, std::min(a.head_dim, 256), 0, s>>>(workspace, out, a, d.max_splits, pass);
  check_launch("attention_decode combine");
}

void attention_prefill(const float* qkv, const void* k_cache, const void* v_cache, float* out, bool f16,
                       const UpgAttnArgs& a, const int32_t* pass, cudaStream_t s) {
  check_attn(a, "attention_prefill");
  const dim3 grid(a.n_heads, (a.n_tokens + kPreQ - 1) / kPreQ);
  const size_t smem = prefill_smem(a);
  if (f16)
    k_attn_prefill<__half><<<grid, kPreThreads, smem, s>>>(qkv, static_cast<const __half*>(k_cache),
                                                            static_cast<const __half*>(v_cache), out, a, pass);
  else
    k_attn_prefill<float><<<grid, kPreThreads, smem, s>>>(qkv, static_cast<const float*>(k_cache),
                                                           static_cast<const float*>(v_cache), out, a, pass);
  check_launch("attention_prefill");
}

}  // namespace upg::cuda
