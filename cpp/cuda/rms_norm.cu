// RMSNorm: out[t][i] = w[i] * (x[t][i] * inv), inv = 1 / sqrt(mean_i(x[t][i]^2) + eps), as the CPU
// backend computes it. One block of kNormThreads per token, in the order of common.cuh's RMSNorm
// helpers, which the mat-vec's fused prologue shares: a thread's squares of 16-byte units (or
// floats) kNormThreads apart, kNormUnits of them loaded at a time, warp sums, then the warps' sums.
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

__global__ void __launch_bounds__(kNormThreads) k_rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                                          float* __restrict__ out, UpgNormArgs a, int last_only,
                                                          const int32_t* __restrict__ pass) {
  constexpr int U = kNormUnits;
  pdl_enter();
  const int n_tok = n_tokens(pass);
  if (int(blockIdx.x) >= (last_only ? 1 : n_tok)) return;
  const int t_in = last_only ? n_tok - 1 : int(blockIdx.x);
  const float* xr = x + int64_t(t_in) * a.n;
  float* o = out + int64_t(blockIdx.x) * a.n;
  __shared__ double red[kNormThreads / 32];
  double s = 0.0;
  const bool vec = (a.n & 3) == 0 && (reinterpret_cast<uintptr_t>(xr) & 15) == 0 && (reinterpret_cast<uintptr_t>(w) & 15) == 0;
  const int units = a.n / 4;
  const float4* x4 = reinterpret_cast<const float4*>(xr);
  if (vec) {
    for (int u0 = threadIdx.x; u0 < units; u0 += kNormThreads * U) {
      float4 v[U];
#pragma unroll
      for (int i = 0; i < U; ++i)
        if (u0 + i * kNormThreads < units) v[i] = x4[u0 + i * kNormThreads];
#pragma unroll
      for (int i = 0; i < U; ++i)
        if (u0 + i * kNormThreads < units) s = add_squares(s, v[i]);
    }
  } else {
    for (int i = threadIdx.x; i < a.n; i += kNormThreads) s = add_squares(s, xr[i]);
  }
  const float inv = rms_inverse(s, a.n, a.eps, red);
  if (vec) {
    const float4* w4 = reinterpret_cast<const float4*>(w);
    const bool vec_out = (reinterpret_cast<uintptr_t>(o) & 15) == 0;
    for (int u0 = threadIdx.x; u0 < units; u0 += kNormThreads * U) {
      float4 v[U], g[U];
#pragma unroll
      for (int i = 0; i < U; ++i)
        if (u0 + i * kNormThreads < units) v[i] = x4[u0 + i * kNormThreads], g[i] = w4[u0 + i * kNormThreads];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int u = u0 + i * kNormThreads;
        if (u >= units) continue;
        const float4 r = rms_scale(v[i], g[i], inv);
        if (vec_out) reinterpret_cast<float4*>(o)[u] = r;
        else o[4 * u] = r.x, o[4 * u + 1] = r.y, o[4 * u + 2] = r.z, o[4 * u + 3] = r.w;
      }
    }
  } else {
    for (int i = threadIdx.x; i < a.n; i += kNormThreads) o[i] = rms_scale(xr[i], w[i], inv);
  }
}

}  // namespace

void rms_norm(const float* x, const float* weight, float* out, const UpgNormArgs& a, int capacity, bool last_only,
              const int32_t* pass, cudaStream_t s) {
  if (a.n < 1 || capacity < 1) throw std::invalid_argument("cuda rms_norm: bad shape");
  launch("rms_norm", k_rms_norm, last_only ? 1 : capacity, kNormThreads, 0, s, x, weight, out, a, last_only ? 1 : 0, pass);
}

}  // namespace upg::cuda
