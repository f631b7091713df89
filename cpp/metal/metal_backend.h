// The Metal backend's host side (Apple only; built when CMake finds APPLE). NEVER RUN YET: no Mac
// was available, so this file and metal_backend.mm have not been compiled; the kernels they
// dispatch are verified on Linux by tests/test_metal_kernels.py (docs/METAL.md).
//
// One Device per process holds the MTLDevice, its queue and the compiled kernels; weights are
// zero-copy MTLBuffers over the mapped file's data section; the KV cache and activations are GPU
// buffers; a decode step records all its dispatches into one command buffer (begin() ... end()).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "upg/quant.h"
#include "upg_quant.h"  // metal/: the kernels' constants and argument structs

namespace upg::metal {

// A range of one GPU buffer: id is the Device's handle (-1: none), offset in bytes.
struct Buf {
  int id = -1;
  uint64_t offset = 0;
  Buf at(uint64_t bytes) const { return Buf{id, offset + bytes}; }
};

// A weight matrix [rows, cols] of any UPG type inside a weights buffer, with optional outliers.
struct Matrix {
  DType type = DType::F32;
  int block = 0;
  int64_t rows = 0, cols = 0;
  Buf data;                     // first byte of the tensor (its sections follow, FORMAT.md)
  Buf rowptr, col, val;         // CSR outliers, id -1 when absent
};

class Device {
 public:
  // Opens the system default GPU and loads the kernels from `metallib` (built with the package);
  // when that file is missing, compiles the sources in `source_dir` (metal/*.metal) instead.
  // Throws std::runtime_error when there is no Metal device or neither loads.
  static std::unique_ptr<Device> open(const std::string& metallib, const std::string& source_dir);
  ~Device();

  // A buffer over [data, data + bytes) without copying. data must be 16 KiB aligned and bytes a
  // multiple of 16 KiB (the UPG data section is both); the memory must outlive the Device.
  Buf wrap(const void* data, size_t bytes);
  // A new zero-filled shared buffer (KV cache, activations).
  Buf alloc(size_t bytes);
  // CPU address of a shared buffer range (read logits, write token ids).
  void* contents(Buf b);

  // Records every following op into one command buffer; end() commits it and waits, throwing
  // std::runtime_error when the GPU reports an error.
  void begin();
  void end();

  // ---- ops, one per kernel family (metal/*.metal documents each) ----
  void matvec(const Matrix& w, Buf x, Buf y);
  void matmul(const Matrix& w, Buf x, int n_tokens, Buf y, int ldy);
  void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out);
  void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps);
  void rope(Buf qkv, Buf factors, const UpgRopeArgs& args);  // factors.id -1: none
  // KV cache (f16 or f32): append the token rows' K and V, then attend.
  void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args);
  void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, bool prefill,
                 const UpgAttnArgs& args);
  void silu_mul(Buf gate_up, Buf out, int n_tokens, int n, int in_stride);
  void add(Buf x, Buf y, int n);  // x += y
  void argmax(Buf x, int n, Buf out);

 private:
  struct Impl;
  explicit Device(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace upg::metal
