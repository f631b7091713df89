// Decode mat-vec: y[r] = sum_k W[r][k] * x[k] (+ the row's sparse outliers, same pass).
// A threadgroup has UPG_MV_SG simdgroups; each owns UPG_MV_ROWS consecutive rows, its lanes stride
// the blocks of those rows (x is read once per block for all of them), and one simd_sum per row
// finishes the dot. Dispatch: ceil(rows / (UPG_MV_SG * UPG_MV_ROWS)) threadgroups of
// UPG_MV_SG * 32 threads.
#include <metal_stdlib>
#include "upg_dequant.h"
using namespace metal;

template <int DT, int B>
inline void upg_matvec(device const uchar* w, device const float* x, device float* y,
                       device const int* rowptr, device const int* col, device const half* val,
                       constant UpgMatArgs& a, uint tgpig, uint tiisg, uint sgitg) {
  const int r0 = (int(tgpig) * UPG_MV_SG + int(sgitg)) * UPG_MV_ROWS;
  float sums[UPG_MV_ROWS];
  for (int i = 0; i < UPG_MV_ROWS; ++i) {
    const int r = r0 + i;
    sums[i] = r < a.rows ? upg_row_partial<DT, B>(w, a, r, x, tiisg) +
                               upg_outlier_partial(a, rowptr, col, val, r, x, tiisg)
                         : 0.0f;
  }
  // simd_sum outside the row guard: every lane of the simdgroup must take part.
  for (int i = 0; i < UPG_MV_ROWS; ++i) {
    const float s = simd_sum(sums[i]);
    if (tiisg == 0 && r0 + i < a.rows) y[r0 + i] = s;
  }
}

#define UPG_MATVEC_KERNEL(NAME, DT, B)                                                        \
  kernel void NAME(device const uchar* w [[buffer(0)]], device const float* x [[buffer(1)]],  \
                   device float* y [[buffer(2)]], device const int* rowptr [[buffer(3)]],     \
                   device const int* col [[buffer(4)]], device const half* val [[buffer(5)]], \
                   constant UpgMatArgs& a [[buffer(6)]],                                      \
                   uint tgpig [[threadgroup_position_in_grid]],                               \
                   uint tiisg [[thread_index_in_simdgroup]],                                  \
                   uint sgitg [[simdgroup_index_in_threadgroup]]) {                           \
    upg_matvec<DT, B>(w, x, y, rowptr, col, val, a, tgpig, tiisg, sgitg);                     \
  }

UPG_MATVEC_KERNEL(kernel_matvec_f32, UPG_DTYPE_F32, 0)
UPG_MATVEC_KERNEL(kernel_matvec_f16, UPG_DTYPE_F16, 0)
UPG_MATVEC_KERNEL(kernel_matvec_bf16, UPG_DTYPE_BF16, 0)
UPG_MATVEC_KERNEL(kernel_matvec_q8_0_b32, UPG_DTYPE_Q8_0, 32)
UPG_MATVEC_KERNEL(kernel_matvec_q8_0_b64, UPG_DTYPE_Q8_0, 64)
UPG_MATVEC_KERNEL(kernel_matvec_q4_b32, UPG_DTYPE_Q4, 32)
UPG_MATVEC_KERNEL(kernel_matvec_q4_b64, UPG_DTYPE_Q4, 64)
UPG_MATVEC_KERNEL(kernel_matvec_q3_b32, UPG_DTYPE_Q3, 32)
UPG_MATVEC_KERNEL(kernel_matvec_q3_b64, UPG_DTYPE_Q3, 64)
UPG_MATVEC_KERNEL(kernel_matvec_iq4_nl_b32, UPG_DTYPE_IQ4_NL, 32)
UPG_MATVEC_KERNEL(kernel_matvec_iq4_xs_b32, UPG_DTYPE_IQ4_XS, 32)
UPG_MATVEC_KERNEL(kernel_matvec_iq3_b32, UPG_DTYPE_IQ3, 32)
