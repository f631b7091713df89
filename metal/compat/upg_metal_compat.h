// The subset of the Metal Shading Language that the kernels in metal/ use, emulated in C++ so the
// same sources compile with g++ and run on the CPU harness (tests/metal_harness/). Each GPU thread
// is a fiber there; threadgroup_barrier and every simd_* call synchronize the fibers through the
// runtime declared below. docs/METAL.md lists what this header supports.
//
// The harness strips every [[...]] attribute before compiling and passes buffers, threadgroup
// memory and built-in indices in the declared order. Math goes through GCC builtins so that no C
// or C++ library header adds overloads that would clash with these.
#pragma once
#include <stddef.h>
#include <stdint.h>

// ---- address spaces and function qualifiers ----
#define device
#define constant const
#define thread
// The harness preprocesses with -DUPG_KERNEL=<marker> -DUPG_THREADGROUP=<marker> to find the
// kernels and their [[threadgroup(i)]] parameters after macro expansion.
#ifndef UPG_KERNEL
#define UPG_KERNEL
#endif
#ifndef UPG_THREADGROUP
#define UPG_THREADGROUP
#endif
#define kernel UPG_KERNEL
#define threadgroup UPG_THREADGROUP

#define FLT_MAX 3.402823466e+38f
#define INT_MAX 2147483647
#define INFINITY __builtin_inff()

// ---- the runtime: implemented by tests/metal_harness/runtime.cpp ----
extern "C" {
// Waits until every thread of the threadgroup arrived at the same barrier.
void upg_rt_threadgroup_barrier(const void* site);
// Deposits this lane's `size` bytes, waits until every lane of the simdgroup arrived at the same
// call, then copies all lanes' values into `all` (lane order). Returns this lane's index and sets
// *n_lanes to the simdgroup's width.
unsigned upg_rt_simd_gather(const void* mine, unsigned size, void* all, unsigned* n_lanes,
                            const void* site);
// Fails the launch with this message (a use the emulation or Metal does not allow).
void upg_rt_fail(const char* message);
}

// ---- built-in types (global in MSL, as is as_type) ----
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

// ---- vector types: vec<T, N> with .x .y .z .w and elementwise arithmetic ----
template <class T, int N> struct vec_storage;
template <class T> struct vec_storage<T, 2> { T x, y; };
template <class T> struct vec_storage<T, 3> { T x, y, z; };
template <class T> struct vec_storage<T, 4> { T x, y, z, w; };

template <bool B> struct upg_enable_if {};
template <> struct upg_enable_if<true> { typedef int type; };

template <class T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  vec(T s) { for (int i = 0; i < N; ++i) (*this)[i] = s; }
  template <class... A, typename upg_enable_if<sizeof...(A) == N && (N > 1)>::type = 0>
  vec(A... a) {
    const T v[N] = {T(a)...};
    for (int i = 0; i < N; ++i) (*this)[i] = v[i];
  }
  template <class U> explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);
  }
  T& operator[](int i) { return (&this->x)[i]; }
  const T& operator[](int i) const { return (&this->x)[i]; }
};

#define UPG_VEC_OP(op)                                                                   \
  template <class T, int N> vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {     \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b[i];                                     \
    return a;                                                                            \
  }                                                                                      \
  template <class T, int N> vec<T, N> operator op(vec<T, N> a, T b) {                    \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b;                                        \
    return a;                                                                            \
  }                                                                                      \
  template <class T, int N> vec<T, N> operator op(T a, vec<T, N> b) {                    \
    for (int i = 0; i < N; ++i) b[i] = a op b[i];                                        \
    return b;                                                                            \
  }                                                                                      \
  template <class T, int N> vec<T, N>& operator op##=(vec<T, N>& a, const vec<T, N>& b) { \
    return a = a op b;                                                                   \
  }
UPG_VEC_OP(+)
UPG_VEC_OP(-)
UPG_VEC_OP(*)
UPG_VEC_OP(/)
#undef UPG_VEC_OP

#define UPG_VEC_TYPES(T)      \
  typedef vec<T, 2> T##2;     \
  typedef vec<T, 3> T##3;     \
  typedef vec<T, 4> T##4;
UPG_VEC_TYPES(float)
UPG_VEC_TYPES(half)
UPG_VEC_TYPES(int)
UPG_VEC_TYPES(uint)
UPG_VEC_TYPES(short)
UPG_VEC_TYPES(ushort)
UPG_VEC_TYPES(char)
UPG_VEC_TYPES(uchar)
#undef UPG_VEC_TYPES

template <class T, int N> T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s += a[i] * b[i];
  return s;
}

// ---- reinterpretation ----
template <class T, class U> T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  T t;
  __builtin_memcpy(&t, &u, sizeof(T));
  return t;
}

namespace metal {

// ---- math (float; half converts through float) ----
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float sin(float x) { return __builtin_sinf(x); }
inline float pow(float x, float y) { return __builtin_powf(x, y); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float floor(float x) { return __builtin_floorf(x); }
inline float fabs(float x) { return __builtin_fabsf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline bool isnan(float x) { return __builtin_isnan(x); }
inline bool isinf(float x) { return __builtin_isinf(x); }
template <class T> T max(T a, T b) { return a < b ? b : a; }
template <class T> T min(T a, T b) { return b < a ? b : a; }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }

// ---- threadgroup and simdgroup synchronization ----
enum mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// Every fiber synchronizes on the next sync point anyway, so memory is coherent at barriers.
__attribute__((noinline)) inline void threadgroup_barrier(mem_flags) {
  upg_rt_threadgroup_barrier(__builtin_return_address(0));
}
__attribute__((noinline)) inline void simdgroup_barrier(mem_flags) {
  unsigned n;
  char all[32];
  const char none = 0;
  upg_rt_simd_gather(&none, 1, all, &n, __builtin_return_address(0));
}

// All lanes' values of one simd_* call. simd_gather is never inlined and the simd_* wrappers always
// are, so the return address names the call site in the kernel (the runtime checks that every lane
// of a simdgroup reached the same one).
#define UPG_INLINE __attribute__((always_inline)) inline
template <class T> struct simd_lanes {
  T v[32];
  unsigned n, lane;
};
template <class T> __attribute__((noinline)) simd_lanes<T> simd_gather(T x) {
  simd_lanes<T> s;
  s.lane = upg_rt_simd_gather(&x, sizeof(T), s.v, &s.n, __builtin_return_address(0));
  return s;
}

template <class T> UPG_INLINE T simd_sum(T x) {
  const simd_lanes<T> s = simd_gather(x);
  T r = s.v[0];
  for (unsigned i = 1; i < s.n; ++i) r += s.v[i];
  return r;
}
template <class T> UPG_INLINE T simd_max(T x) {
  const simd_lanes<T> s = simd_gather(x);
  T r = s.v[0];
  for (unsigned i = 1; i < s.n; ++i) r = max(r, s.v[i]);
  return r;
}
template <class T> UPG_INLINE T simd_min(T x) {
  const simd_lanes<T> s = simd_gather(x);
  T r = s.v[0];
  for (unsigned i = 1; i < s.n; ++i) r = min(r, s.v[i]);
  return r;
}
template <class T> UPG_INLINE T simd_broadcast(T x, ushort lane) {
  const simd_lanes<T> s = simd_gather(x);
  if (lane >= s.n) upg_rt_fail("simd_broadcast: lane out of range");
  return s.v[lane < s.n ? lane : 0];
}
template <class T> UPG_INLINE T simd_broadcast_first(T x) { return simd_gather(x).v[0]; }
template <class T> UPG_INLINE T simd_shuffle(T x, ushort lane) { return simd_broadcast(x, lane); }
template <class T> UPG_INLINE T simd_shuffle_down(T x, ushort delta) {
  const simd_lanes<T> s = simd_gather(x);
  return s.lane + delta < s.n ? s.v[s.lane + delta] : x;
}
template <class T> UPG_INLINE T simd_shuffle_up(T x, ushort delta) {
  const simd_lanes<T> s = simd_gather(x);
  return s.lane >= delta ? s.v[s.lane - delta] : x;
}
template <class T> UPG_INLINE T simd_shuffle_xor(T x, ushort mask) {
  const simd_lanes<T> s = simd_gather(x);
  return (s.lane ^ mask) < s.n ? s.v[s.lane ^ mask] : x;
}
UPG_INLINE bool simd_all(bool x) {
  const simd_lanes<bool> s = simd_gather(x);
  for (unsigned i = 0; i < s.n; ++i) if (!s.v[i]) return false;
  return true;
}
UPG_INLINE bool simd_any(bool x) {
  const simd_lanes<bool> s = simd_gather(x);
  for (unsigned i = 0; i < s.n; ++i) if (s.v[i]) return true;
  return false;
}

// ---- simdgroup matrices (8x8): the simdgroup owns one matrix; each fiber keeps a full copy ----
// Supported: make_filled_simdgroup_matrix, simdgroup_load / simdgroup_store with elements_per_row
// (no origin, no transpose) and simdgroup_multiply_accumulate. Loads and stores check that every
// lane passed the same address, as Metal requires.
template <class T, int C, int R> struct simdgroup_matrix {
  T e[R * C];  // row-major
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;

template <class T, int C, int R> simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < R * C; ++i) m.e[i] = v;
  return m;
}

inline void simd_check_uniform(const void* p) {
  const simd_lanes<const void*> s = simd_gather(p);
  for (unsigned i = 0; i < s.n; ++i)
    if (s.v[i] != p) upg_rt_fail("simdgroup_load/store: lanes passed different addresses");
}

template <class T, int C, int R>
void simdgroup_load(simdgroup_matrix<T, C, R>& m, const T* src, ulong elements_per_row = C) {
  simd_check_uniform(src);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) m.e[i * C + j] = src[i * elements_per_row + j];
}

template <class T, int C, int R>
void simdgroup_store(const simdgroup_matrix<T, C, R>& m, T* dst, ulong elements_per_row = C) {
  simd_check_uniform(dst);
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) dst[i * elements_per_row + j] = m.e[i * C + j];
}

// d = a * b + c, products summed in float.
template <class TD, class TA, class TB, class TC, int N>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, N, N>& d, const simdgroup_matrix<TA, N, N>& a,
                                   const simdgroup_matrix<TB, N, N>& b,
                                   const simdgroup_matrix<TC, N, N>& c) {
  simdgroup_matrix<TD, N, N> r;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < N; ++j) {
      float s = float(c.e[i * N + j]);
      for (int k = 0; k < N; ++k) s += float(a.e[i * N + k]) * float(b.e[k * N + j]);
      r.e[i * N + j] = TD(s);
    }
  d = r;
}

}  // namespace metal
