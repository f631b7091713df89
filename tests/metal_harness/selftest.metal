// Kernels that test the harness itself (tests/test_metal_kernels.py): counted barriers and simd_*
// exchanges with threads that drift apart, and the errors for a deadlock and divergent barriers.
#include <metal_stdlib>
#include "upg_common.h"
using namespace metal;

// Odd threads spin before writing; after the barrier every thread reads its neighbour's slot, so a
// barrier that does not wait for all threads shows as a wrong (0xff) value.
kernel void selftest_barrier(device float* out [[buffer(0)]], threadgroup float* slot [[threadgroup(0)]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint ntg [[threads_per_threadgroup]]) {
  float v = float(tid);
  if (tid % 2 == 1) {
    for (int i = 0; i < 100; ++i) v = v * 1.0f + 0.0f;
  }
  slot[tid] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = slot[(tid + 1) % ntg];
}

// Per lane: simd_sum, simd_max, simd_shuffle_down(1), simd_shuffle_xor(1), simd_broadcast(lane 3)
// and simd_min of a value that depends on the lane.
kernel void selftest_simd(device const float* x [[buffer(0)]], device float* out [[buffer(1)]],
                          uint tid [[thread_index_in_threadgroup]]) {
  const float v = x[tid];
  out[tid * 6 + 0] = simd_sum(v);
  out[tid * 6 + 1] = simd_max(v);
  out[tid * 6 + 2] = simd_shuffle_down(v, 1);
  out[tid * 6 + 3] = simd_shuffle_xor(v, 1);
  out[tid * 6 + 4] = simd_broadcast(v, 3);
  out[tid * 6 + 5] = simd_min(v);
}

// Thread 0 returns before the barrier the others wait at.
kernel void selftest_deadlock(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 0) return;
  threadgroup_barrier(mem_flags::mem_device);
  out[tid] = 1.0f;
}

// Even and odd threads wait at two different barriers.
kernel void selftest_divergent(device float* out [[buffer(0)]], uint tid [[thread_index_in_threadgroup]]) {
  if (tid % 2 == 0) {
    threadgroup_barrier(mem_flags::mem_device);
    out[tid] = 1.0f;
  } else {
    out[tid] = 2.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] += 3.0f;
  }
}
