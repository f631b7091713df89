// Device helpers shared by the CUDA kernels (cpp/cuda/*.cu): type decoding, the swizzle of the
// activation vector in shared memory, warp reductions, per-pass values. Layouts: docs/FORMAT.md.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

#include "kernels.cuh"

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

// Weight matrix of any type, byte pointers resolved (UpgMatArgs offsets applied).
struct MatView {
  const uint8_t* codes;   // dense elements, or qs / ql
  const uint8_t* high;    // q3 qh
  const uint16_t* scales; // f16 bits, [rows][cols / block]
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
