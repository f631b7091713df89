// Prefill mat-mat: y[t * ldy + r] = sum_k W[r][k] * x[t * cols + k] (+ outliers) for n_tokens
// tokens, with 8x8 simdgroup matrices. A threadgroup computes a UPG_MM_TN x UPG_MM_TM tile of y
// (tokens x rows): per UPG_MM_TK step its threads decode the weight tile once into threadgroup
// memory, transposed (k x rows), stage the x tile beside it, and each simdgroup accumulates the
// 8 rows it owns for all tile tokens. Ragged edges are zero-filled on load and skipped on store.
// Dispatch: (ceil(rows / UPG_MM_TM), ceil(n_tokens / UPG_MM_TN)) threadgroups of UPG_MM_SG * 32
// threads; threadgroup memory 0, 1, 2: UPG_MM_TK*UPG_MM_TM, UPG_MM_TN*UPG_MM_TK and
// UPG_MM_TN*UPG_MM_TM floats.
#include <metal_stdlib>
#include "upg_dequant.h"
using namespace metal;

template <int DT, int B>
inline void upg_matmul(device const uchar* w, device const float* x, device float* y,
                       device const int* rowptr, device const int* col, device const half* val,
                       constant UpgMatArgs& a, threadgroup float* tw, threadgroup float* tx,
                       threadgroup float* ty, uint2 tgpig, uint tpitg, uint ntg, uint sgitg) {
  const int r0 = int(tgpig.x) * UPG_MM_TM, t0 = int(tgpig.y) * UPG_MM_TN;
  simdgroup_float8x8 acc[UPG_MM_TN / 8];
  for (int j = 0; j < UPG_MM_TN / 8; ++j) acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  for (int k0 = 0; k0 < a.cols; k0 += UPG_MM_TK) {
    // tw[kk][rr] = W[r0 + rr][k0 + kk]: consecutive threads read consecutive k of one row.
    for (int i = int(tpitg); i < UPG_MM_TM * UPG_MM_TK; i += int(ntg)) {
      const int rr = i / UPG_MM_TK, kk = i % UPG_MM_TK, r = r0 + rr, k = k0 + kk;
      tw[kk * UPG_MM_TM + rr] = (r < a.rows && k < a.cols) ? upg_elem<DT, B>(w, a, r, k) : 0.0f;
    }
    for (int i = int(tpitg); i < UPG_MM_TN * UPG_MM_TK; i += int(ntg)) {
      const int tt = i / UPG_MM_TK, kk = i % UPG_MM_TK, t = t0 + tt, k = k0 + kk;
      tx[i] = (t < a.n_tokens && k < a.cols) ? x[t * a.cols + k] : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int kk = 0; kk < UPG_MM_TK; kk += 8) {
      simdgroup_float8x8 mw;  // 8 k x 8 rows
      simdgroup_load(mw, tw + kk * UPG_MM_TM + sgitg * 8, UPG_MM_TM);
      for (int j = 0; j < UPG_MM_TN / 8; ++j) {
        simdgroup_float8x8 mx;  // 8 tokens x 8 k
        simdgroup_load(mx, tx + j * 8 * UPG_MM_TK + kk, UPG_MM_TK);
        simdgroup_multiply_accumulate(acc[j], mx, mw, acc[j]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (int j = 0; j < UPG_MM_TN / 8; ++j)
    simdgroup_store(acc[j], ty + j * 8 * UPG_MM_TM + sgitg * 8, UPG_MM_TM);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = int(tpitg); i < UPG_MM_TN * UPG_MM_TM; i += int(ntg)) {
    const int t = t0 + i / UPG_MM_TM, r = r0 + i % UPG_MM_TM;
    if (t >= a.n_tokens || r >= a.rows) continue;
    float v = ty[i];
    if (a.has_outliers != 0)
      for (int o = rowptr[r]; o < rowptr[r + 1]; ++o) v += float(val[o]) * x[t * a.cols + col[o]];
    y[t * a.ldy + r] = v;
  }
}

#define UPG_MATMUL_KERNEL(NAME, DT, B)                                                        \
  kernel void NAME(device const uchar* w [[buffer(0)]], device const float* x [[buffer(1)]],  \
                   device float* y [[buffer(2)]], device const int* rowptr [[buffer(3)]],     \
                   device const int* col [[buffer(4)]], device const half* val [[buffer(5)]], \
                   constant UpgMatArgs& a [[buffer(6)]], threadgroup float* tw [[threadgroup(0)]], \
                   threadgroup float* tx [[threadgroup(1)]],                                  \
                   threadgroup float* ty [[threadgroup(2)]],                                  \
                   uint2 tgpig [[threadgroup_position_in_grid]],                              \
                   uint tpitg [[thread_index_in_threadgroup]],                                \
                   uint ntg [[threads_per_threadgroup]],                                      \
                   uint sgitg [[simdgroup_index_in_threadgroup]]) {                           \
    upg_matmul<DT, B>(w, x, y, rowptr, col, val, a, tw, tx, ty, tgpig, tpitg, ntg, sgitg);    \
  }

UPG_MATMUL_KERNEL(kernel_matmul_f32, UPG_DTYPE_F32, 0)
UPG_MATMUL_KERNEL(kernel_matmul_f16, UPG_DTYPE_F16, 0)
UPG_MATMUL_KERNEL(kernel_matmul_bf16, UPG_DTYPE_BF16, 0)
UPG_MATMUL_KERNEL(kernel_matmul_q8_0_b32, UPG_DTYPE_Q8_0, 32)
UPG_MATMUL_KERNEL(kernel_matmul_q8_0_b64, UPG_DTYPE_Q8_0, 64)
UPG_MATMUL_KERNEL(kernel_matmul_q4_b32, UPG_DTYPE_Q4, 32)
UPG_MATMUL_KERNEL(kernel_matmul_q4_b64, UPG_DTYPE_Q4, 64)
UPG_MATMUL_KERNEL(kernel_matmul_q3_b32, UPG_DTYPE_Q3, 32)
UPG_MATMUL_KERNEL(kernel_matmul_q3_b64, UPG_DTYPE_Q3, 64)
UPG_MATMUL_KERNEL(kernel_matmul_iq4_nl_b32, UPG_DTYPE_IQ4_NL, 32)
UPG_MATMUL_KERNEL(kernel_matmul_iq4_xs_b32, UPG_DTYPE_IQ4_XS, 32)
UPG_MATMUL_KERNEL(kernel_matmul_iq3_b32, UPG_DTYPE_IQ3, 32)
