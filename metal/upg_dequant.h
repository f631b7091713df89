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

constant char upg_iq4_grid[16] = UPG_IQ4_GRID;
constant char upg_iq3_grid[8] = UPG_IQ3_GRID;

inline bool upg_has_super(int dt) { return dt == UPG_DTYPE_IQ4_XS || dt == UPG_DTYPE_IQ3; }

// Code (grid index) of element j of iq3 block g (upg::iq3_code): codes go by groups of 4 blocks.
inline int upg_iq3_code(device const uchar* ql, device const uchar* qh, int g, int j) {
  const int p = g & 3;
  const int lo = (ql[(g >> 2) * 32 + j] >> (2 * p)) & 3;
  const int hi = (qh[(g >> 2) * 16 + (j & 15)] >> (2 * p + (j >> 4))) & 1;
  return lo | (hi << 2);
}

// Scale of block b of row r: its f16 scale, or (iq4_xs, iq3) the super-scale times (ls - 32).
template <int DT>
inline float upg_scale(device const uchar* w, constant UpgMatArgs& a, int r, int b) {
  device const half* d = (device const half*)(w + a.scales_offset);
  const int nb = a.cols / a.block;
  if (!upg_has_super(DT)) return float(d[r * nb + b]);
  device const uchar* sc = w + a.sub_offset + r * (nb / 2 + nb / 4);
  const int ls = ((sc[b / 2] >> (4 * (b & 1))) & 15) | (((sc[nb / 2 + b / 4] >> (2 * (b & 3))) & 3) << 4);
  return float(d[r * (a.cols / UPG_SUPER_BLOCK) + b / 8]) * float(ls - UPG_SUB_SCALE_BIAS);
}

// Signed value of element j of block b of row r, unscaled (the block's first element is e).
template <int DT, int B>
inline int upg_code(device const uchar* w, constant UpgMatArgs& a, int r, int b, int e, int j) {
  if (DT == UPG_DTYPE_Q8_0) return ((device const char*)w)[e + j];
  if (DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS) {
    const uchar q = w[e / 2 + j % (B / 2)];
    const int c = j < B / 2 ? (q & 15) : (q >> 4);
    return DT == UPG_DTYPE_Q4 ? c - UPG_Q4_ZERO : upg_iq4_grid[c];
  }
  if (DT == UPG_DTYPE_IQ3) return upg_iq3_grid[upg_iq3_code(w, w + a.high_offset, e / B, j)];
  return upg_q3_code<B>(w + e / 4, w + a.high_offset + e / 8, j) - UPG_Q3_ZERO;
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
  return upg_scale<DT>(w, a, r, b) * float(upg_code<DT, BB>(w, a, r, b, r * a.cols + b * BB, j));
}

// sum_j W_block[j] * x[j] over block b of row r, without the scale; x points at the block's first
// input element.
template <int DT, int B>
inline float upg_block_dot(device const uchar* w, constant UpgMatArgs& a, int r, int b,
                           device const float* x) {
  const int e = r * a.cols + b * B;  // first element of the block
  float s = 0.0f;
  if (DT == UPG_DTYPE_Q4 || DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS) {
    device const uchar* q = w + e / 2;
    for (int j = 0; j < B / 2; ++j) {
      const int lo = q[j] & 15, hi = q[j] >> 4;
      s += float(DT == UPG_DTYPE_Q4 ? lo - UPG_Q4_ZERO : upg_iq4_grid[lo]) * x[j];
      s += float(DT == UPG_DTYPE_Q4 ? hi - UPG_Q4_ZERO : upg_iq4_grid[hi]) * x[j + B / 2];
    }
  } else {
    for (int j = 0; j < B; ++j) s += float(upg_code<DT, B>(w, a, r, b, e, j)) * x[j];
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
      s += upg_scale<DT>(w, a, r, b) * upg_block_dot<DT, BB>(w, a, r, b, x + b * BB);
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
