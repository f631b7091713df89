// Elementwise kernels, one thread per element; dispatch ceil(count / 256) threadgroups of 256.
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

// out[t][i] = silu(gate) * up over the fused gate_up output: per token, in[0..n) is the gate and
// in[n..2n) the up projection; rows of in are in_stride floats apart, rows of out n.
kernel void kernel_silu_mul(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                            constant UpgEltArgs& a [[buffer(2)]],
                            uint tpig [[thread_position_in_grid]]) {
  const int t = int(tpig) / a.n, i = int(tpig) % a.n;
  if (t >= a.n_tokens) return;
  const float g = in[t * a.in_stride + i], u = in[t * a.in_stride + a.n + i];
  out[t * a.n + i] = g / (1.0f + exp(-g)) * u;
}

// Residual: x[i] += y[i] for i < n * n_tokens.
kernel void kernel_add(device float* x [[buffer(0)]], device const float* y [[buffer(1)]],
                       constant UpgEltArgs& a [[buffer(2)]], uint tpig [[thread_position_in_grid]]) {
  if (int(tpig) < a.n * a.n_tokens) x[tpig] += y[tpig];
}
