// RoPE, rotate-half (NeoX) layout, in place over the query and key heads of each token row. Only
// the first rot_dims of a head rotate; pair i is (i, i + rot_dims/2):
//   angle = pos * inv_freq[i],  c = cos(angle) * attn_factor, s = sin(angle) * attn_factor,
//   x[i], x[i + rot/2] = x[i] c - x[i + rot/2] s, x[i + rot/2] c + x[i] s.
// inv_freq is the model's (LongRoPE factors applied), computed once on the host for every backend.
// The angle is computed in double: positions reach 10^5 and an f32 angle would be off by 1e-2 rad.
// Each token's position and inverse-frequency set come from its UpgToken in the pass buffer (a pass
// may hold tokens of several sequences; rope_set 1 reads the long set, rot_dims / 2 floats on).
// One thread per (pair, head, token).
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

__global__ void k_rope(float* __restrict__ qk, const float* __restrict__ inv_freq, UpgRopeArgs a,
                       const int32_t* __restrict__ pass) {
  pdl_enter();
  const int i = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y, t = blockIdx.z, half_rot = a.rot_dims / 2;
  if (i >= half_rot || t >= n_tokens(pass)) return;
  const UpgToken& tok = pass_token(pass, t);  // its position, and LongRoPE's set of its sequence
  double sn, cs;
  sincos(double(tok.pos) * double(inv_freq[tok.rope_set * half_rot + i]), &sn, &cs);
  const float c = float(cs) * a.attn_factor, s = float(sn) * a.attn_factor;
  float* p = qk + int64_t(t) * a.token_stride + h * a.head_dim;
  const float x0 = p[i], x1 = p[i + half_rot];
  p[i] = x0 * c - x1 * s;
  p[i + half_rot] = x1 * c + x0 * s;
}

}  // namespace

void rope(float* qkv, const float* inv_freq, const UpgRopeArgs& a, const int32_t* pass, cudaStream_t s) {
  if (a.rot_dims < 2 || a.rot_dims % 2 != 0 || a.rot_dims > a.head_dim || a.n_heads < 1 || a.n_tokens < 1)
    throw std::invalid_argument("cuda rope: bad shape");
  const dim3 grid((a.rot_dims / 2 + 63) / 64, a.n_heads, a.n_tokens);
  if (inv_freq == nullptr) throw std::invalid_argument("cuda rope: no inverse frequencies");
  launch("rope", k_rope, grid, 64, 0, s, qkv, inv_freq, a, pass);
}

}  // namespace upg::cuda
