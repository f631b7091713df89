// RMSNorm: out[t][i] = x[t][i] / sqrt(mean_i(x[t][i]^2) + eps) * w[i]. One threadgroup of
// UPG_REDUCE_THREADS threads per token: strided partial sums, simd_sum, then the simdgroup sums
// through threadgroup memory (UPG_REDUCE_THREADS / 32 floats).
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

kernel void kernel_rms_norm(device const float* x [[buffer(0)]], device const float* w [[buffer(1)]],
                            device float* out [[buffer(2)]], constant UpgNormArgs& a [[buffer(3)]],
                            threadgroup float* partial [[threadgroup(0)]],
                            uint tgpig [[threadgroup_position_in_grid]],
                            uint tpitg [[thread_index_in_threadgroup]],
                            uint ntg [[threads_per_threadgroup]],
                            uint tiisg [[thread_index_in_simdgroup]],
                            uint sgitg [[simdgroup_index_in_threadgroup]]) {
  device const float* xr = x + int(tgpig) * a.n;
  device float* o = out + int(tgpig) * a.n;
  float s = 0.0f;
  for (int i = int(tpitg); i < a.n; i += int(ntg)) s += xr[i] * xr[i];
  s = simd_sum(s);
  if (tiisg == 0) partial[sgitg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  for (uint g = 0; g < (ntg + UPG_SIMD_WIDTH - 1) / UPG_SIMD_WIDTH; ++g) total += partial[g];
  const float inv = rsqrt(total / float(a.n) + a.eps);
  for (int i = int(tpitg); i < a.n; i += int(ntg)) o[i] = xr[i] * inv * w[i];
}
