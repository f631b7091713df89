// RMSNorm: out[t][i] = x[t][i] / sqrt(mean_i(x[t][i]^2) + eps) * w[i]. One block of 256 threads
// per token: strided sum of squares, warp sums, then the warps' sums through shared memory.
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) k_rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                                      float* __restrict__ out, UpgNormArgs a, int last_only,
                                                      const int32_t* __restrict__ pass) {
  pdl_enter();
  const int n_tok = n_tokens(pass);
  if (int(blockIdx.x) >= (last_only ? 1 : n_tok)) return;
  const int t_in = last_only ? n_tok - 1 : int(blockIdx.x);
  const float* xr = x + int64_t(t_in) * a.n;
  float* o = out + int64_t(blockIdx.x) * a.n;
  __shared__ float partial[kThreads / 32];
  float s = 0.0f;
  for (int i = threadIdx.x; i < a.n; i += kThreads) s += xr[i] * xr[i];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int g = 0; g < kThreads / 32; ++g) total += partial[g];
  const float inv = rsqrtf(total / float(a.n) + a.eps);
  for (int i = threadIdx.x; i < a.n; i += kThreads) o[i] = xr[i] * inv * w[i];
}

}  // namespace

void rms_norm(const float* x, const float* weight, float* out, const UpgNormArgs& a, int capacity, bool last_only,
              const int32_t* pass, cudaStream_t s) {
  if (a.n < 1 || capacity < 1) throw std::invalid_argument("cuda rms_norm: bad shape");
  launch("rms_norm", k_rms_norm, last_only ? 1 : capacity, kThreads, 0, s, x, weight, out, a, last_only ? 1 : 0, pass);
}

}  // namespace upg::cuda
