// Run-time choice of the kernel path: what this build has, what the CPU and OS run, and the
// UPG_SIMD override.
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "upg/kernels.h"

namespace upg {

extern const Kernels kScalarKernels;
#ifdef UPG_X86
extern const Kernels kAvx2Kernels;
extern const Kernels kAvx512Kernels;
#endif

namespace {

#ifdef UPG_X86
// XCR0: which register states the OS saves on a context switch. A CPU with AVX-512 under an OS
// (or hypervisor) that does not save ZMM state must not use it.
uint64_t xcr0() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx")) return 0;  // implies OSXSAVE on every CPU gcc knows
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool can_run_avx2() {
  constexpr uint64_t kYmm = 0x6;  // SSE + AVX state
  return (xcr0() & kYmm) == kYmm && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool can_run_avx512() {
  constexpr uint64_t kZmm = 0xe6;  // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
  return can_run_avx2() && (xcr0() & kZmm) == kZmm && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
#endif

const Kernels& choose() {
  if (const char* env = std::getenv("UPG_SIMD"); env && *env) {
    if (const Kernels* k = kernels_by_name(env)) return *k;
    throw std::runtime_error(std::string("UPG_SIMD=") + env +
                             ": not a kernel path this build and CPU run (scalar, avx2, avx512)");
  }
#ifdef UPG_X86
  if (can_run_avx512()) return kAvx512Kernels;
  if (can_run_avx2()) return kAvx2Kernels;
#endif
  return kScalarKernels;
}

}  // namespace

const Kernels* kernels_by_name(const char* name) {
  if (std::strcmp(name, "scalar") == 0) return &kScalarKernels;
#ifdef UPG_X86
  if (std::strcmp(name, "avx2") == 0 && can_run_avx2()) return &kAvx2Kernels;
  if (std::strcmp(name, "avx512") == 0 && can_run_avx512()) return &kAvx512Kernels;
#endif
  return nullptr;
}

const Kernels& kernels() {
  static const Kernels& chosen = choose();  // a bad UPG_SIMD throws again on the next call
  return chosen;
}

}  // namespace upg
