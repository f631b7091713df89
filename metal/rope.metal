// RoPE, rotate-half (NeoX) layout, in place over the query and key heads of each token (the Q and
// K rows of the fused qkv output, consecutive heads of head_dim floats). Only the first rot_dims of
// a head rotate (partial rotary); pair i is (i, i + rot_dims/2):
//   angle = pos * inv_freq[i],  c = cos(angle) * attn_factor,  s = sin(angle) * attn_factor,
//   x[i], x[i + rot/2] = x[i] * c - x[i + rot/2] * s,  x[i + rot/2] * c + x[i] * s.
// inv_freq[] is the model's (LongRoPE factors applied; the host picks the set of a pass of one
// sequence, a batch's sequences say theirs: rope_set), computed once on the host for every backend;
// each token's position comes from the pass buffer (its UpgToken after the UpgPass header).
// Dispatch: one thread per (pair, head, token): threadgroups (ceil(rot/2 / 32), n_heads, n_tokens)
// of 32 x 1 x 1 threads.
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

kernel void kernel_rope(device float* qk [[buffer(0)]], device const float* inv_freq [[buffer(1)]],
                        device const UpgPass* pass [[buffer(2)]], constant UpgRopeArgs& a [[buffer(3)]],
                        uint3 tpig [[thread_position_in_grid]]) {
  const int i = int(tpig.x), h = int(tpig.y), t = int(tpig.z), half_rot = a.rot_dims / 2;
  if (i >= half_rot || h >= a.n_heads || t >= a.n_tokens) return;
  device const UpgToken& tok = ((device const UpgToken*)(pass + 1))[t];
  const float angle = float(tok.pos) * inv_freq[tok.rope_set * half_rot + i];
  const float c = cos(angle) * a.attn_factor, s = sin(angle) * a.attn_factor;
  device float* p = qk + t * a.token_stride + h * a.head_dim;
  const float x0 = p[i], x1 = p[i + half_rot];
  p[i] = x0 * c - x1 * s;
  p[i + half_rot] = x1 * c + x0 * s;
}
