// UPG tensor types in C++: each type's layout (docs/FORMAT.md is the spec) over the codes and
// alignments of upg_common.h, which the Metal and CUDA kernels include too. The writer (through the
// bindings) and every CPU path follow this header.
#pragma once
#include <cstdint>
#include <cstring>

#include "upg/upg_common.h"

// The layout helpers below are also device functions in the CUDA kernels (cpp/cuda/).
#ifdef __CUDACC__
#define UPG_HOST_DEVICE __host__ __device__
#else
#define UPG_HOST_DEVICE
#endif

namespace upg {

enum class DType : uint8_t {
  F32 = UPG_DTYPE_F32, F16 = UPG_DTYPE_F16, BF16 = UPG_DTYPE_BF16, Q8_0 = UPG_DTYPE_Q8_0,
  Q4 = UPG_DTYPE_Q4, Q3 = UPG_DTYPE_Q3, I32 = UPG_DTYPE_I32, IQ4_NL = UPG_DTYPE_IQ4_NL,
  IQ4_XS = UPG_DTYPE_IQ4_XS, IQ3 = UPG_DTYPE_IQ3,
};
constexpr int kNumDTypes = UPG_NUM_DTYPES;

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
    case DType::Q8_0: return "q8_0";
    case DType::Q4: return "q4";
    case DType::Q3: return "q3";
    case DType::I32: return "i32";
    case DType::IQ4_NL: return "iq4_nl";
    case DType::IQ4_XS: return "iq4_xs";
    case DType::IQ3: return "iq3";
  }
  return "?";
}

inline bool is_quantized(DType t) { return t != DType::F32 && t != DType::F16 && t != DType::BF16 && t != DType::I32; }

// The format version that introduced a type: a file's version is the highest of its types' (FORMAT.md).
inline uint32_t dtype_version(DType t) { return uint8_t(t) >= UPG_DTYPE_IQ4_NL ? 2 : 1; }

// Types whose elements are scale * grid[code] (upg_common.h's grids).
constexpr bool has_grid(DType t) { return t == DType::IQ4_NL || t == DType::IQ4_XS || t == DType::IQ3; }
// Types with an f16 super-scale per UPG_SUPER_BLOCK elements and 6-bit sub-block scales.
constexpr bool has_super_block(DType t) { return t == DType::IQ4_XS || t == DType::IQ3; }
constexpr int8_t kIq4Grid[16] = UPG_IQ4_GRID;
constexpr int8_t kIq3Grid[8] = UPG_IQ3_GRID;

// Why a quantized [*, cols] matrix of type t cannot have this block size, or nullptr when it can.
inline const char* quant_shape_error(DType t, uint64_t cols, int block) {
  if (has_grid(t)) {
    if (block != 32) return "block must be 32 for this type";
  } else if (block != 32 && block != 64) {
    return "block must be 32 or 64";
  }
  if (cols % uint64_t(block)) return "cols must be a multiple of block";
  if (has_super_block(t) && cols % UPG_SUPER_BLOCK) return "cols must be a multiple of 256 (the super-block)";
  return nullptr;
}
// What a quantized type's stored code is offset by: element = d * (code - zero_point).
constexpr int zero_point(DType t) { return t == DType::Q4 ? UPG_Q4_ZERO : t == DType::Q3 ? UPG_Q3_ZERO : 0; }

// Element size in bytes of a dense type, 0 for quantized types.
inline int dense_elem_size(DType t) {
  switch (t) {
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: return 2;
    default: return 0;
  }
}

constexpr uint64_t kTensorAlign = UPG_TENSOR_ALIGN;  // every tensor and every section inside one
constexpr uint64_t kDataAlign = UPG_DATA_ALIGN;      // the data section (Apple GPU page)
inline uint64_t pad64(uint64_t n) { return (n + 63) & ~uint64_t(63); }

// Byte sizes of the sections of a quantized [rows, cols] matrix, in file order. Section i starts
// at the sum of the padded sizes before it.
struct QuantSections {
  uint64_t codes;   // qs (q8_0, q4, iq4_nl, iq4_xs) or ql (q3, iq3)
  uint64_t high;    // qh (q3, iq3), else 0
  uint64_t sub;     // sub-block scales (iq4_xs, iq3), else 0
  uint64_t scales;  // f16 per block, or per super-block (iq4_xs, iq3)
  uint64_t total() const { return pad64(codes) + pad64(high) + pad64(sub) + pad64(scales); }
  uint64_t high_offset() const { return pad64(codes); }
  uint64_t sub_offset() const { return pad64(codes) + pad64(high); }
  uint64_t scales_offset() const { return pad64(codes) + pad64(high) + pad64(sub); }
};

inline QuantSections quant_sections(DType t, uint64_t rows, uint64_t cols, uint64_t block) {
  const uint64_t nb = cols / block;
  QuantSections s{0, 0, 0, rows * nb * 2};
  if (t == DType::Q8_0) s.codes = rows * cols;
  if (t == DType::Q4 || t == DType::IQ4_NL || t == DType::IQ4_XS) s.codes = rows * cols / 2;
  if (t == DType::Q3 || t == DType::IQ3) { s.codes = rows * cols / 4; s.high = rows * cols / 8; }
  if (has_super_block(t)) {
    s.sub = rows * (nb / 2 + nb / 4);  // per row: 4 low bits of each ls, then 2 high bits
    s.scales = rows * (cols / UPG_SUPER_BLOCK) * 2;
  }
  return s;
}

// The 6-bit scale code ls of sub-block j of a row whose sub section starts at `sub` (nb sub-blocks):
// its low 4 bits in nibble j % 2 of byte j / 2, its high 2 bits at bits 2 * (j % 4) of byte
// nb / 2 + j / 4 (FORMAT.md). Static: each SIMD path's translation unit compiles its own copy with
// its own instruction set (simd_kernels.h says why that matters).
UPG_HOST_DEVICE static inline int sub_scale_code(const uint8_t* sub, int64_t nb, int64_t j) {
  return ((sub[j / 2] >> (4 * (j & 1))) & 15) | (((sub[nb / 2 + j / 4] >> (2 * (j & 3))) & 3) << 4);
}

// Code (grid index) of element j of iq3 block g (global: row * nb + block). Codes are packed per
// group of 4 blocks (128 elements, FORMAT.md): ql byte i of the group holds the low 2 bits of
// element i of its block p at bits 2p; qh byte i the high bit of group element 16k + i at bit k.
// Static: see sub_scale_code.
UPG_HOST_DEVICE static inline int iq3_code(const uint8_t* ql, const uint8_t* qh, int64_t g, int j) {
  const int p = int(g & 3);
  const int lo = (ql[(g >> 2) * 32 + j] >> (2 * p)) & 3;
  const int hi = (qh[(g >> 2) * 16 + (j & 15)] >> (2 * p + (j >> 4))) & 1;
  return lo | (hi << 2);
}

// Code of element j of a q3 block (B = block size) from its ql and qh bytes.
inline int q3_code(const uint8_t* ql, const uint8_t* qh, int B, int j) {
  const int lo = (ql[j % (B / 4)] >> (2 * (j / (B / 4)))) & 3;
  const int hi = (qh[j % (B / 8)] >> (j / (B / 8))) & 1;
  return lo | (hi << 2);
}

// ---- half and bfloat16 conversions (portable; SIMD paths use F16C where present) ----
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) { bits = sign; }
    else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f; std::memcpy(&f, &bits, 4); return f;
}

// Round to nearest even, as numpy's float32 -> float16 cast.
inline uint16_t f32_to_f16(float f) {
  uint32_t x; std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0);  // inf / nan
  if (ax >= 0x477ff000u) return sign | 0x7c00;                                    // overflow
  if (ax < 0x38800000u) {                                                         // subnormal / zero
    if (ax < 0x33000000u) return sign;
    // value = m * 2^(e-150); in units of the f16 subnormal step 2^-24 that is m >> (126 - e)
    const uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
    const int shift = 126 - int(e);
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    uint32_t res = m >> shift;
    if (rem > half || (rem == half && (res & 1))) ++res;
    return sign | uint16_t(res);
  }
  uint32_t res = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (res & 1))) ++res;
  return sign | uint16_t(res);
}

inline float bf16_to_f32(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f; std::memcpy(&f, &bits, 4); return f;
}

}  // namespace upg
