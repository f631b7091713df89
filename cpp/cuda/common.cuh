// Device helpers shared by the CUDA kernels (cpp/cuda/*.cu): type decoding, the swizzle of the
// activation vector in shared memory, warp reductions, per-pass values. Layouts: docs/FORMAT.md.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "kernels.cuh"
#include "upg/quant.h"

namespace upg::cuda::dev {

constexpr int kWarp = 32;

__device__ __forceinline__ float f16(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ float bf16(uint16_t bits) { return __uint_as_float(uint32_t(bits) << 16); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- RMSNorm and SiLU-mul in one order of operations, shared by their own kernels (rms_norm.cu,
// elementwise.cu) and the mat-vec's fused prologue (matvec.cu), so that a fused decode step has the
// bits of the unfused ops (a sequence alone and in a batch, whose generated rows run unfused:
// docs/ARCHITECTURE.md "Batch-invariant arithmetic"). Written out (no contraction left to the
// compiler). RMSNorm as the CPU backend computes it: the squares summed in double, the inverse norm
// float(1 / sqrt(sum / n + eps)) in double, each output w * (x * inv) in f32; only the order of the
// double sum differs (an inverse norm one f32 ulp apart needs that order to move a sum across a
// rounding tie of the float; not measured row by row).
constexpr int kNormThreads = 512;  // threads of a block that norms one row: the mat-vec's block
constexpr int kNormUnits = 8;      // 16-byte units a thread loads before it uses the first
// A thread's running sum of squares: thread i takes the 16-byte units i, i + kNormThreads, ... of the
// row (or its floats, where the row or the weight is not 16-byte aligned or n % 4 != 0).
__device__ __forceinline__ double add_squares(double ss, float4 a) {
  const double s = __dadd_rn(__dadd_rn(__dadd_rn(__dmul_rn(a.x, a.x), __dmul_rn(a.y, a.y)), __dmul_rn(a.z, a.z)),
                             __dmul_rn(a.w, a.w));
  return __dadd_rn(ss, s);
}
__device__ __forceinline__ double add_squares(double ss, float a) { return __dadd_rn(ss, __dmul_rn(a, a)); }
// The inverse norm of the row from every thread's sum (all threads of the block; red: kNormThreads
// / 32 doubles of shared memory): warp sums, then the warps' sums in order.
__device__ __forceinline__ float rms_inverse(double ss, int n, float eps, double* red) {
  for (int o = 16; o > 0; o >>= 1) ss = __dadd_rn(ss, __shfl_xor_sync(0xffffffffu, ss, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  double total = 0.0;
  for (int i = 0; i < kNormThreads / 32; ++i) total = __dadd_rn(total, red[i]);
  return float(__ddiv_rn(1.0, __dsqrt_rn(__dadd_rn(__ddiv_rn(total, double(n)), double(eps)))));
}
__device__ __forceinline__ float rms_scale(float x, float w, float inv) { return __fmul_rn(w, __fmul_rn(x, inv)); }
__device__ __forceinline__ float4 rms_scale(float4 x, float4 w, float inv) {
  return make_float4(rms_scale(x.x, w.x, inv), rms_scale(x.y, w.y, inv), rms_scale(x.z, w.z, inv), rms_scale(x.w, w.w, inv));
}
__device__ __forceinline__ float silu_mul1(float g, float u) { return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, __expf(-g))), u); }

// Programmatic dependent launch (sm_90+; no-ops before): every kernel lets the next launch begin
// at once (trigger), and waits for the previous grid's completion and memory (wait) before it
// reads anything that grid may write. Code before the wait may only read the weights.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Both, at the top of a kernel that reads nothing before the wait.
__device__ __forceinline__ void pdl_enter() {
  pdl_trigger();
  pdl_wait();
}

// Per-pass values (kernels.cuh: PassSlot).
__device__ __forceinline__ int n_past(const int32_t* pass) { return pass[kPassNPast]; }
__device__ __forceinline__ int n_tokens(const int32_t* pass) { return pass[kPassNTokens]; }
// Token t's entry and sequence s's entry of the pass buffer (upg_common.h: UpgPass, then one
// UpgToken per token, then one UpgSeq per sequence).
__device__ __forceinline__ const UpgToken& pass_token(const int32_t* pass, int t) {
  return reinterpret_cast<const UpgToken*>(pass + sizeof(UpgPass) / 4)[t];
}
__device__ __forceinline__ const UpgSeq& pass_seq(const int32_t* pass, int s) {
  return reinterpret_cast<const UpgSeq*>(pass + sizeof(UpgPass) / 4 + n_tokens(pass) * (sizeof(UpgToken) / 4))[s];
}

// x lives in shared memory as 16-byte units with unit u stored at u ^ ((u >> S) & 7): the lanes
// of a mat-vec warp read units S bits apart, and the XOR spreads them over the 8 bank groups.
// Any S >= 1 is a bijection; S is picked per weight type (matvec.cu).
template <int S>
__device__ __forceinline__ int swz(int unit) { return unit ^ ((unit >> S) & 7); }
template <int S>
__device__ __forceinline__ int swz_float(int i) { return (swz<S>(i >> 2) << 2) | (i & 3); }

// ---- The grid types (iq4_nl, iq4_xs, iq3): a code indexes upg_common.h's grid ----
// The grids as byte-permute tables (bytes 4i..4i+3 of word i: entries 4i..4i+3). A selector nibble
// of prmt picks one of 8 bytes with its low 3 bits; with bit 3 set, PTX's prmt yields the sign of
// that byte replicated instead (the mat-vec's split lookup, grid4_split, relies on it), while
// CUDA's __byte_perm clears bit 3 first (one more instruction).
__host__ __device__ constexpr uint32_t grid_word(const int8_t* g, int i, int sign = 1) {
  return uint32_t(uint8_t(sign * g[4 * i])) | uint32_t(uint8_t(sign * g[4 * i + 1])) << 8 |
         uint32_t(uint8_t(sign * g[4 * i + 2])) << 16 | uint32_t(uint8_t(sign * g[4 * i + 3])) << 24;
}
constexpr uint32_t kGrid4W0 = grid_word(kIq4Grid, 0), kGrid4W1 = grid_word(kIq4Grid, 1);
constexpr uint32_t kGrid4W2 = grid_word(kIq4Grid, 2), kGrid4W3 = grid_word(kIq4Grid, 3);
constexpr uint32_t kGrid4NegW0 = grid_word(kIq4Grid, 0, -1), kGrid4NegW1 = grid_word(kIq4Grid, 1, -1);
constexpr uint32_t kGrid3W0 = grid_word(kIq3Grid, 0), kGrid3W1 = grid_word(kIq3Grid, 1);
constexpr bool grid4_signs_split() {
  for (int i = 0; i < 16; ++i)
    if (i < 8 ? !(kIq4Grid[i] < 0 && kIq4Grid[i] > -128) : !(kIq4Grid[i] > 0)) return false;
  return true;
}
static_assert(grid4_signs_split(), "grid4_split needs codes 0..7 negative (> -128) and 8..15 positive");

template <int DT>
constexpr bool kGridType = DT == UPG_DTYPE_IQ4_NL || DT == UPG_DTYPE_IQ4_XS || DT == UPG_DTYPE_IQ3;
template <int DT>
constexpr bool kSuperBlock = DT == UPG_DTYPE_IQ4_XS || DT == UPG_DTYPE_IQ3;

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
}

// Grid value of one code (iq4: 0..15, iq3: 0..7).
__device__ __forceinline__ int grid4(int q) {
  const uint32_t lo = __byte_perm(kGrid4W0, kGrid4W1, q & 7), hi = __byte_perm(kGrid4W2, kGrid4W3, q & 7);
  return int8_t((q & 8 ? hi : lo) & 0xff);
}
__device__ __forceinline__ int grid3(int q) { return int8_t(__byte_perm(kGrid3W0, kGrid3W1, q) & 0xff); }

// The 8 codes of a word of 4-bit codes (nibble n: code n) as int8 grid values, those of the low
// nibbles in .x, of the high nibbles in .y (llama.cpp's get_int_from_table_16): two lookups into
// the halves of the grid and a select by each code's bit 3 (the low half's lookup may take the
// sign path for codes >= 8: the select drops those bytes).
__device__ __forceinline__ uint2 grid4_words(uint32_t q) {
  const uint32_t sel = 0x32103210u | ((q & 0x88888888u) >> 1);
  uint32_t t[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t s = q >> (16 * i);
    t[i] = prmt(prmt(kGrid4W0, kGrid4W1, s), __byte_perm(kGrid4W2, kGrid4W3, s), sel >> (16 * i));
  }
  return make_uint2(prmt(t[0], t[1], 0x6420), prmt(t[0], t[1], 0x7531));
}

// The codes of selector nibbles 0..3 of s (4-bit codes) split by sign with one lookup each and no
// select: pos = the grid values of codes 8..15 (0 for the others), neg = minus the grid values of
// codes 0..7 (0 for the others). Both tables are positive, so a selector whose bit 3 picks the
// other half yields 0; grid value . x = dp4a(pos, x) - dp4a(neg, x).
__device__ __forceinline__ void grid4_split(uint32_t s, uint32_t& pos, uint32_t& neg) {
  neg = prmt(kGrid4NegW0, kGrid4NegW1, s);
  pos = prmt(kGrid4W2, kGrid4W3, s ^ 0x8888u);
}

// The bits of 1.5 * 2^23: kMagic + i is the float 1.5 * 2^23 + i for |i| < 2^22, so an integer
// sum started at kMagic becomes a float with one subtraction of kMagicF (no conversion).
constexpr int kMagic = 0x4B400000;
constexpr float kMagicF = 12582912.0f;

// ls - 32 as a float for a 6-bit code ls: the float 2^23 + ls less 2^23 + 32, both exact (an
// integer add and a float add instead of a conversion, which the CUDA programming guide rates at
// a quarter of an integer add).
__device__ __forceinline__ float sub_scale(int ls) { return __int_as_float(0x4B000000 + ls) - (8388608.0f + UPG_SUB_SCALE_BIAS); }

// Scale of block b of row r of a grid type: its f16 scale (iq4_nl), or the super-block's f16
// scale times (ls - 32) (iq4_xs, iq3). Unsigned indices: the layout helper's 64-bit division
// then reduces to shifts.
template <int DT>
__device__ __forceinline__ float grid_scale(const uint16_t* scales, const uint8_t* sub, int cols, int r, int b) {
  const uint32_t nb = uint32_t(cols) / 32, ub = uint32_t(b);
  if constexpr (kSuperBlock<DT>)
    return f16(scales[uint64_t(r) * (nb / 8) + ub / 8]) * sub_scale(sub_scale_code(sub + uint64_t(r) * (nb / 2 + nb / 4), nb, ub));
  return f16(scales[uint64_t(r) * nb + ub]);
}

// Weight matrix of any type, byte pointers resolved (UpgMatArgs offsets applied).
struct MatView {
  const uint8_t* codes;   // dense elements, or qs / ql
  const uint8_t* high;    // q3 and iq3: qh
  const uint8_t* sub;     // iq4_xs and iq3: the 6-bit sub-block scales
  const uint16_t* scales; // f16 bits, [rows][cols / block] (iq4_xs, iq3: [rows][cols / 256])
  int rows, cols, block;
  const int32_t* rowptr;  // CSR outliers, nullptr when absent
  const int32_t* col;
  const uint16_t* val;    // f16 bits
};

// Element k of row r, outliers excluded. Generic (scalar) decoder for get_rows and ragged tiles.
template <int DT, int B>
__device__ __forceinline__ float elem(const MatView& m, int r, int k) {
  const int64_t i = int64_t(r) * m.cols + k;
  if constexpr (DT == UPG_DTYPE_F32) return reinterpret_cast<const float*>(m.codes)[i];
  if constexpr (DT == UPG_DTYPE_F16) return f16(reinterpret_cast<const uint16_t*>(m.codes)[i]);
  if constexpr (DT == UPG_DTYPE_BF16) return bf16(reinterpret_cast<const uint16_t*>(m.codes)[i]);
  if constexpr (kGridType<DT>) {  // block 32
    const int64_t g = i / 32;
    const int j = k % 32;
    const float d = grid_scale<DT>(m.scales, m.sub, m.cols, r, k / 32);
    if constexpr (DT == UPG_DTYPE_IQ3) return d * float(grid3(iq3_code(m.codes, m.high, g, j)));
    const uint8_t q = m.codes[g * 16 + j % 16];
    return d * float(grid4(j < 16 ? q & 15 : q >> 4));
  }
  constexpr int BB = B > 0 ? B : 32;
  const int b = k / BB, j = k % BB;
  const float d = f16(m.scales[int64_t(r) * (m.cols / BB) + b]);
  const int64_t e = int64_t(r) * m.cols + int64_t(b) * BB;  // first element of the block
  if constexpr (DT == UPG_DTYPE_Q8_0) return d * float(reinterpret_cast<const int8_t*>(m.codes)[i]);
  if constexpr (DT == UPG_DTYPE_Q4) {
    const uint8_t q = m.codes[e / 2 + j % (BB / 2)];
    return d * float(int(j < BB / 2 ? (q & 15) : (q >> 4)) - UPG_Q4_ZERO);
  }
  const int lo = (m.codes[e / 4 + j % (BB / 4)] >> (2 * (j / (BB / 4)))) & 3;
  const int hi = (m.high[e / 8 + j % (BB / 8)] >> (j / (BB / 8))) & 1;
  return d * float((lo | (hi << 2)) - UPG_Q3_ZERO);
}

// cp.async of C bytes (4, 8 or 16), zero-filled when !ok (src must still be a valid address).
template <int C>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int n = ok ? C : 0;
  if constexpr (C == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(d), "l"(src), "n"(C), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// ldmatrix: four 8 x 8 matrices of 16-bit elements (8 rows of 16 bytes each, row addresses from lanes
// 8q..8q + 7 for matrix q); thread l gets row l / 4, elements 2 (l % 4), +1 of each (.trans: the
// transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

}  // namespace upg::cuda::dev

namespace upg::cuda {

// Throws std::runtime_error naming the call when a CUDA call failed.
void check(cudaError_t e, const char* what);
// Whether launches carry the programmatic-stream-serialization attribute (init: on for sm_90+).
bool programmatic_launch();

// kernel<<<grid, block, smem, s>>>(args...), with programmatic dependent launch when enabled.
template <class... P, class... A>
void launch(const char* what, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic_launch() ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...), what);
}

// Multiprocessors of the current device, and the shared memory a block may opt into (read once,
// by init or the first launch that needs them).
int sm_count();
int max_smem_optin();
// Lets kernel use all the dynamic shared memory a block may opt into (minus its static share).
void allow_max_smem(const void* kernel);
// Resolves the section pointers of a weight.
dev::MatView view(const Weight& w);
// Throws unless dtype/block is a type the kernels handle.
void check_weight(const Weight& w, const char* what);

}  // namespace upg::cuda

namespace upg::cuda::dev {

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }

}  // namespace upg::cuda::dev
