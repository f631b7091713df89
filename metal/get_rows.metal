// Embedding lookup: out[t][k] = W[ids[t]][k] for every k, outliers included. One threadgroup per
// token; its threads stride the columns, then (after a barrier, so the dense values are in place)
// the row's CSR entries, whose columns are distinct. An id outside [0, rows) yields a zero row.
// Dispatch: n_tokens threadgroups of any size up to 1024.
#include <metal_stdlib>
#include "upg_dequant.h"
using namespace metal;

template <int DT, int B>
inline void upg_get_rows(device const uchar* w, device const int* ids, device float* out,
                         device const int* rowptr, device const int* col, device const half* val,
                         constant UpgMatArgs& a, uint tgpig, uint tpitg, uint ntg) {
  const int r = ids[tgpig];
  const bool valid = r >= 0 && r < a.rows;
  device float* o = out + int(tgpig) * a.cols;
  for (int k = int(tpitg); k < a.cols; k += int(ntg)) o[k] = valid ? upg_elem<DT, B>(w, a, r, k) : 0.0f;
  threadgroup_barrier(mem_flags::mem_device);
  if (!valid || a.has_outliers == 0) return;
  for (int i = rowptr[r] + int(tpitg); i < rowptr[r + 1]; i += int(ntg)) o[col[i]] += float(val[i]);
}

#define UPG_GET_ROWS_KERNEL(NAME, DT, B)                                                      \
  kernel void NAME(device const uchar* w [[buffer(0)]], device const int* ids [[buffer(1)]],  \
                   device float* out [[buffer(2)]], device const int* rowptr [[buffer(3)]],   \
                   device const int* col [[buffer(4)]], device const half* val [[buffer(5)]], \
                   constant UpgMatArgs& a [[buffer(6)]],                                      \
                   uint tgpig [[threadgroup_position_in_grid]],                               \
                   uint tpitg [[thread_index_in_threadgroup]],                                \
                   uint ntg [[threads_per_threadgroup]]) {                                    \
    upg_get_rows<DT, B>(w, ids, out, rowptr, col, val, a, tgpig, tpitg, ntg);                 \
  }

UPG_GET_ROWS_KERNEL(kernel_get_rows_f32, UPG_DTYPE_F32, 0)
UPG_GET_ROWS_KERNEL(kernel_get_rows_f16, UPG_DTYPE_F16, 0)
UPG_GET_ROWS_KERNEL(kernel_get_rows_bf16, UPG_DTYPE_BF16, 0)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q8_0_b32, UPG_DTYPE_Q8_0, 32)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q8_0_b64, UPG_DTYPE_Q8_0, 64)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q4_b32, UPG_DTYPE_Q4, 32)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q4_b64, UPG_DTYPE_Q4, 64)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q3_b32, UPG_DTYPE_Q3, 32)
UPG_GET_ROWS_KERNEL(kernel_get_rows_q3_b64, UPG_DTYPE_Q3, 64)
UPG_GET_ROWS_KERNEL(kernel_get_rows_iq4_nl_b32, UPG_DTYPE_IQ4_NL, 32)
UPG_GET_ROWS_KERNEL(kernel_get_rows_iq4_xs_b32, UPG_DTYPE_IQ4_XS, 32)
UPG_GET_ROWS_KERNEL(kernel_get_rows_iq3_b32, UPG_DTYPE_IQ3, 32)
