// Weight decoding shared by the mat-vec, mat-mat and embedding kernels. DT is a UPG_DTYPE_* code,
// B the elements per scale block (0 for dense types); both are template arguments so that every
// kernel entry point gets its own unrolled decoder. BB is B, or a nominal 32 for dense types: the
// quantized branches compile for them too but never run. Layouts: docs/FORMAT.md.
#pragma once
#include "upg_common.h"

inline float upg_f16(device const half* p, int i) { return float(p[i]); }

inline float upg_bf16(device const ushort* p, int i) { return as_type<float>(uint(p[i]) << 16); }

// Code of element j of a q3 block from its ql and qh bytes (upg::q3_code).
template <int B>
inline int upg_q3_code(device const uchar* ql, device const uchar* qh, int j) {
  const int lo = (ql[j % (B / 4)] >> (2 * (j / (B / 4)))) & 3;
  const int hi = (qh[j % (B / 8)] >> (j / (B / 8))) & 1;
  return lo | (hi << 2);
}

// Scale of block b of row r.
inline float upg_scale(device const uchar* w, constant UpgMatArgs& a, int r, int b) {
  device const half* d = (device const half*)(w + a.scales_offset);
  return float(d[r * (a.cols / a.block) + b]);
}

// W[r][k] without outliers.
template <int DT, int B>
inline float upg_elem(device const uchar* w, constant UpgMatArgs& a, int r, int k) {
  enum { BB = B > 0 ? B : 32 };
  const int i = r * a.cols + k;  // element index in the matrix
  if (DT == UPG_DTYPE_F32) return ((device const float*)w)[i];
  if (DT == UPG_DTYPE_F16) return upg_f16((device const half*)w, i);
  if (DT == UPG_DTYPE_BF16) return upg_bf16((device const ushort*)w, i);
  const int b = k / BB, j = k % BB;
  const float d = upg_scale(w, a, r, b);
  if (DT == UPG_DTYPE_Q8_0) return d * float(((device const char*)w)[i]);
  if (DT == UPG_DTYPE_Q4) {
    const uchar q = w[(r * a.cols + b * BB) / 2 + j % (BB / 2)];
    return d * float((j < BB / 2 ? (q & 15) : (q >> 4)) - UPG_Q4_ZERO);
  }
  device const uchar* ql = w + (r * a.cols + b * BB) / 4;
  device const uchar* qh = w + a.high_offset + (r * a.cols + b * BB) / 8;
  return d * float(upg_q3_code<BB>(ql, qh, j) - UPG_Q3_ZERO);
}

// sum_j W_block[j] * x[j] over block b of row r, without the scale; x points at the block's first
// input element.
template <int DT, int B>
inline float upg_block_dot(device const uchar* w, constant UpgMatArgs& a, int r, int b,
                           device const float* x) {
  const int e = r * a.cols + b * B;  // first element of the block
  float s = 0.0f;
  if (DT == UPG_DTYPE_Q8_0) {
    device const char* q = (device const char*)w + e;
    for (int j = 0; j < B; ++j) s += float(q[j]) * x[j];
  } else if (DT == UPG_DTYPE_Q4) {
    device const uchar* q = w + e / 2;
    for (int j = 0; j < B / 2; ++j) {
      s += float((q[j] & 15) - UPG_Q4_ZERO) * x[j];
      s += float((q[j] >> 4) - UPG_Q4_ZERO) * x[j + B / 2];
    }
  } else {
    device const uchar* ql = w + e / 4;
    device const uchar* qh = w + a.high_offset + e / 8;
    for (int j = 0; j < B; ++j) s += float(upg_q3_code<B>(ql, qh, j) - UPG_Q3_ZERO) * x[j];
  }
  return s;
}

// This lane's share of row r times x: lanes stride the blocks (quantized) or the elements (dense).
template <int DT, int B>
inline float upg_row_partial(device const uchar* w, constant UpgMatArgs& a, int r,
                             device const float* x, uint lane) {
  enum { BB = B > 0 ? B : 32 };
  float s = 0.0f;
  if (B == 0) {
    for (int k = int(lane); k < a.cols; k += UPG_SIMD_WIDTH) s += upg_elem<DT, B>(w, a, r, k) * x[k];
  } else {
    const int nb = a.cols / BB;
    for (int b = int(lane); b < nb; b += UPG_SIMD_WIDTH)
      s += upg_scale(w, a, r, b) * upg_block_dot<DT, BB>(w, a, r, b, x + b * BB);
  }
  return s;
}

// This lane's share of the outliers of row r times x (the CSR entries, lanes striding them).
inline float upg_outlier_partial(constant UpgMatArgs& a, device const int* rowptr,
                                 device const int* col, device const half* val, int r,
                                 device const float* x, uint lane) {
  float s = 0.0f;
  if (a.has_outliers == 0) return s;
  for (int i = rowptr[r] + int(lane); i < rowptr[r + 1]; i += UPG_SIMD_WIDTH)
    s += float(val[i]) * x[col[i]];
  return s;
}
