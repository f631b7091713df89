// Glue between the generated launchers (harness.py) and the kernels: turns the untyped buffer and
// threadgroup-memory pointers and the built-in indices into the kernel's declared parameter types.
#pragma once
#include "runtime.h"

// buffer(i) parameters: a pointer, or a reference (`constant Args& a`).
template <class T> struct upg_arg {
  static T get(void* p) { return static_cast<T>(p); }
};
template <class T> struct upg_arg<T&> {
  static T& get(void* p) { return *static_cast<T*>(p); }
};

// Built-in indices: uint/ushort take .x; vectors take as many components as they have.
template <class T> struct upg_builtin {
  static T get(UpgU3 v) { return T(v.x); }
  static T get(unsigned v) { return T(v); }
};
template <class T, int N> struct upg_builtin<vec<T, N>> {
  static vec<T, N> get(UpgU3 v) {
    const unsigned c[3] = {v.x, v.y, v.z};
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = T(c[i]);
    return r;
  }
};
