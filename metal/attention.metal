// Attention over the KV cache, one threadgroup per (query head, token). The UPG_ATTN_SG
// simdgroups split the positions (simdgroup g takes g, g + UPG_ATTN_SG, ...); each keeps an online
// softmax (running max m, running sum l, weighted V sum acc) with lane j owning dims j, j + 32, ...
// of the head; a final pass through threadgroup memory merges the simdgroups' partial results.
// GQA: query head h reads KV head h / (n_heads / n_kv_heads). KV cache: [n_kv_heads][kv_stride]
// [head_dim] of f16 or f32. head_dim is a multiple of 32, at most UPG_ATTN_MAX_HEAD_DIM.
// Dispatch: (n_heads, n_tokens) threadgroups of UPG_ATTN_SG * 32 threads, threadgroup memory 0:
// UPG_ATTN_SG * (head_dim + 2) floats.
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

// out = softmax(q . K[0..n)^T * scale) V[0..n) for one query head; n >= 1.
template <typename KV>
inline void upg_attend(device const float* q, device const KV* kc, device const KV* vc,
                       device float* out, int n, constant UpgAttnArgs& a, threadgroup float* part,
                       uint tpitg, uint ntg, uint tiisg, uint sgitg) {
  const int hd = a.head_dim, nd = hd / UPG_SIMD_WIDTH;
  float qv[UPG_ATTN_MAX_HEAD_DIM / UPG_SIMD_WIDTH], acc[UPG_ATTN_MAX_HEAD_DIM / UPG_SIMD_WIDTH];
  for (int i = 0; i < nd; ++i) {
    qv[i] = q[int(tiisg) + i * UPG_SIMD_WIDTH];
    acc[i] = 0.0f;
  }
  float m = -FLT_MAX, l = 0.0f;  // finite: Metal compiles with fast math
  for (int p = int(sgitg); p < n; p += UPG_ATTN_SG) {
    float s = 0.0f;
    for (int i = 0; i < nd; ++i) s += qv[i] * float(kc[p * hd + int(tiisg) + i * UPG_SIMD_WIDTH]);
    s = simd_sum(s) * a.scale;
    const float m_new = max(m, s), c = exp(m - m_new), e = exp(s - m_new);
    l = l * c + e;
    for (int i = 0; i < nd; ++i)
      acc[i] = acc[i] * c + e * float(vc[p * hd + int(tiisg) + i * UPG_SIMD_WIDTH]);
    m = m_new;
  }
  // part[g] = acc[0..hd), m, l of simdgroup g.
  threadgroup float* mine = part + int(sgitg) * (hd + 2);
  for (int i = 0; i < nd; ++i) mine[int(tiisg) + i * UPG_SIMD_WIDTH] = acc[i];
  if (tiisg == 0) {
    mine[hd] = m;
    mine[hd + 1] = l;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float mx = -FLT_MAX;
  for (int g = 0; g < UPG_ATTN_SG; ++g) mx = max(mx, part[g * (hd + 2) + hd]);
  float den = 0.0f;
  for (int g = 0; g < UPG_ATTN_SG; ++g) den += exp(part[g * (hd + 2) + hd] - mx) * part[g * (hd + 2) + hd + 1];
  for (int d = int(tpitg); d < hd; d += int(ntg)) {
    float num = 0.0f;
    for (int g = 0; g < UPG_ATTN_SG; ++g) num += exp(part[g * (hd + 2) + hd] - mx) * part[g * (hd + 2) + d];
    out[d] = num / den;
  }
}

// Query token t of head h attends positions [kv_base, kv_base + n) of its KV head's run.
template <typename KV>
inline void upg_attention(device const float* q, device const KV* kc, device const KV* vc,
                          device float* out, int n, int kv_base, constant UpgAttnArgs& a,
                          threadgroup float* part, uint2 tgpig, uint tpitg, uint ntg, uint tiisg,
                          uint sgitg) {
  const int h = int(tgpig.x), t = int(tgpig.y), hd = a.head_dim;
  const int kvh = h / (a.n_heads / a.n_kv_heads);
  upg_attend<KV>(q + t * a.q_stride + h * hd, kc + (kvh * a.kv_stride + kv_base) * hd,
                 vc + (kvh * a.kv_stride + kv_base) * hd, out + (t * a.n_heads + h) * hd, n, a, part, tpitg,
                 ntg, tiisg, sgitg);
}

// Token t of the pass attends causally positions [0, pos] of its sequence's slot; pos and the slot
// come from the pass buffer (its UpgToken after the UpgPass header), so a decode step's launch is
// the same at every position.
#define UPG_ATTN_KERNEL(NAME, KV)                                                             \
  kernel void NAME(device const float* q [[buffer(0)]], device const KV* kc [[buffer(1)]],    \
                   device const KV* vc [[buffer(2)]], device float* out [[buffer(3)]],        \
                   device const UpgPass* pass [[buffer(4)]],                                  \
                   constant UpgAttnArgs& a [[buffer(5)]],                                     \
                   threadgroup float* part [[threadgroup(0)]],                                \
                   uint2 tgpig [[threadgroup_position_in_grid]],                              \
                   uint tpitg [[thread_index_in_threadgroup]],                                \
                   uint ntg [[threads_per_threadgroup]],                                      \
                   uint tiisg [[thread_index_in_simdgroup]],                                  \
                   uint sgitg [[simdgroup_index_in_threadgroup]]) {                           \
    device const UpgToken& tok = ((device const UpgToken*)(pass + 1))[tgpig.y];               \
    upg_attention<KV>(q, kc, vc, out, tok.pos + 1, tok.kv_base, a, part, tgpig, tpitg, ntg,   \
                      tiisg, sgitg);                                                          \
  }

UPG_ATTN_KERNEL(kernel_attn_f16, half)
UPG_ATTN_KERNEL(kernel_attn_f32, float)

// Stores the K and V heads of n_tokens fused qkv rows (after RoPE) in the cache: token t goes to
// position kv_base + pos (its UpgToken); positions past kv_stride are dropped (the host never asks
// for them).
// Dispatch: (ceil(head_dim / 32), n_kv_heads, n_tokens) threadgroups of 32 threads.
template <typename KV>
inline void upg_kv_store(device const float* qkv, device KV* kc, device KV* vc,
                         device const UpgToken* toks, constant UpgAttnArgs& a, uint3 tpig) {
  const int d = int(tpig.x), kvh = int(tpig.y), t = int(tpig.z), hd = a.head_dim;
  if (d >= hd || kvh >= a.n_kv_heads || t >= a.n_tokens) return;
  const int at = toks[t].kv_base + toks[t].pos;
  if (at >= a.kv_stride) return;
  device const float* row = qkv + t * a.q_stride;
  const int dst = (kvh * a.kv_stride + at) * hd + d;
  kc[dst] = KV(row[(a.n_heads + kvh) * hd + d]);
  vc[dst] = KV(row[(a.n_heads + a.n_kv_heads + kvh) * hd + d]);
}

#define UPG_KV_STORE_KERNEL(NAME, KV)                                                         \
  kernel void NAME(device const float* qkv [[buffer(0)]], device KV* kc [[buffer(1)]],        \
                   device KV* vc [[buffer(2)]], device const UpgPass* pass [[buffer(3)]],     \
                   constant UpgAttnArgs& a [[buffer(4)]],                                     \
                   uint3 tpig [[thread_position_in_grid]]) {                                  \
    upg_kv_store<KV>(qkv, kc, vc, (device const UpgToken*)(pass + 1), a, tpig);               \
  }

UPG_KV_STORE_KERNEL(kernel_kv_store_f16, half)
UPG_KV_STORE_KERNEL(kernel_kv_store_f32, float)
