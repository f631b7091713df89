// Elementwise kernels (silu_mul, add), greedy argmax and greedy decoding's step.
#include <climits>
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;
constexpr int kArgmaxThreads = 1024;

// out[t][i] = silu(g) * u over the fused gate_up rows: g = in[t][i], u = in[t][n + i].
__global__ void k_silu_mul(const float* __restrict__ in, float* __restrict__ out, UpgEltArgs a,
                           const int32_t* __restrict__ pass) {
  pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (i >= a.n || t >= n_tokens(pass)) return;
  const float g = in[int64_t(t) * a.in_stride + i], u = in[int64_t(t) * a.in_stride + a.n + i];
  out[int64_t(t) * a.n + i] = silu_mul1(g, u);  // the mat-vec's fused prologue computes the same (common.cuh)
}

__global__ void k_add(float* __restrict__ x, const float* __restrict__ y, UpgEltArgs a, const int32_t* __restrict__ pass) {
  pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
  if (i >= a.n || t >= n_tokens(pass)) return;
  x[int64_t(t) * a.n + i] += y[int64_t(t) * a.n + i];
}

// (v, idx) := the largest v of the warp with its lowest idx, in every lane.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Lowest index of the largest value: strided scan, warp reduction, then warp 0 over the warps.
__global__ void __launch_bounds__(kArgmaxThreads) k_argmax(const float* __restrict__ x, int n, int32_t* __restrict__ out) {
  pdl_enter();
  float v = -INFINITY;
  int idx = INT_MAX;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    if (x[i] > v || idx == INT_MAX) {  // the first element seen is taken even when -inf
      v = x[i];
      idx = i;
    }
  __shared__ float bv[32];
  __shared__ int bi[32];
  warp_argmax(v, idx);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    bv[warp] = v;
    bi[warp] = idx;
  }
  __syncthreads();
  if (warp != 0) return;
  v = lane < int(blockDim.x >> 5) ? bv[lane] : -INFINITY;
  idx = lane < int(blockDim.x >> 5) ? bi[lane] : INT_MAX;
  warp_argmax(v, idx);
  if (lane == 0) out[0] = idx == INT_MAX ? 0 : idx;
}

__global__ void k_next_token(int32_t* pass, const int32_t* token, int32_t* out) {
  pdl_enter();
  UpgPass* p = reinterpret_cast<UpgPass*>(pass);
  UpgToken* t = reinterpret_cast<UpgToken*>(p + 1);
  UpgSeq* s = reinterpret_cast<UpgSeq*>(t + p->n_tokens);
  out[p->n_past] = token[0];
  ++p->n_past, ++t->pos, ++s->n_past;
}

}  // namespace

void silu_mul(const float* gate_up, float* out, const UpgEltArgs& a, const int32_t* pass, cudaStream_t s) {
  if (a.n < 1 || a.n_tokens < 1 || a.in_stride < 2 * a.n) throw std::invalid_argument("cuda silu_mul: bad shape");
  launch("silu_mul", k_silu_mul, dim3((a.n + kThreads - 1) / kThreads, a.n_tokens), kThreads, 0, s, gate_up, out, a, pass);
}

void add(float* x, const float* y, const UpgEltArgs& a, const int32_t* pass, cudaStream_t s) {
  if (a.n < 1 || a.n_tokens < 1) throw std::invalid_argument("cuda add: bad shape");
  launch("add", k_add, dim3((a.n + kThreads - 1) / kThreads, a.n_tokens), kThreads, 0, s, x, y, a, pass);
}

void argmax(const float* x, int n, int32_t* out, cudaStream_t s) {
  if (n < 1) throw std::invalid_argument("cuda argmax: empty input");
  launch("argmax", k_argmax, 1, kArgmaxThreads, 0, s, x, n, out);
}

void next_token(int32_t* pass, const int32_t* token, int32_t* out, cudaStream_t s) {
  launch("next_token", k_next_token, 1, 1, 0, s, pass, token, out);
}

}  // namespace upg::cuda
