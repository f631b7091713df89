// Greedy decoding. kernel_argmax: out[0] = the index of the largest of x[0..n), the lowest index on ties (as
// numpy.argmax). One threadgroup of UPG_REDUCE_THREADS threads: strided scan, then a simdgroup
// reduction, then one thread over the simdgroups' results in threadgroup memory (0: values,
// 1: indices, UPG_REDUCE_THREADS / 32 entries each).
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

kernel void kernel_argmax(device const float* x [[buffer(0)]], device int* out [[buffer(1)]],
                          constant UpgEltArgs& a [[buffer(2)]],
                          threadgroup float* best_v [[threadgroup(0)]],
                          threadgroup int* best_i [[threadgroup(1)]],
                          uint tpitg [[thread_index_in_threadgroup]],
                          uint ntg [[threads_per_threadgroup]],
                          uint tiisg [[thread_index_in_simdgroup]],
                          uint sgitg [[simdgroup_index_in_threadgroup]]) {
  float v = -FLT_MAX;
  int idx = INT_MAX;
  for (int i = int(tpitg); i < a.n; i += int(ntg))
    if (x[i] > v || (x[i] == v && idx == INT_MAX)) {
      v = x[i];
      idx = i;
    }
  const float sv = simd_max(v);
  const int si = simd_min(v == sv ? idx : INT_MAX);
  if (tiisg == 0) {
    best_v[sgitg] = sv;
    best_i[sgitg] = si;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tpitg != 0) return;
  float bv = best_v[0];
  int bi = best_i[0];
  for (uint g = 1; g < (ntg + UPG_SIMD_WIDTH - 1) / UPG_SIMD_WIDTH; ++g)
    if (best_v[g] > bv || (best_v[g] == bv && best_i[g] < bi)) {
      bv = best_v[g];
      bi = best_i[g];
    }
  out[0] = bi == INT_MAX ? 0 : bi;
}

// Greedy decoding's step (Backend::next_token), one thread: the token argmax chose is appended at
// its place in out, and the pass moves on to it, so the next decode pass needs no upload.
kernel void kernel_next_token(device UpgPass* pass [[buffer(0)]], device const int* tokens [[buffer(1)]],
                              device int* out [[buffer(2)]]) {
  device UpgToken* tok = (device UpgToken*)(pass + 1);
  device UpgSeq* seq = (device UpgSeq*)(tok + pass->n_tokens);
  out[pass->n_past] = tokens[0];
  pass->n_past += 1;
  tok->pos += 1;
  seq->n_past += 1;
}
