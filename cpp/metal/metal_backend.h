// The Metal backend's host side (Apple only; built when CMake finds APPLE). NEVER RUN YET: no Mac
// was available, so this file and metal_backend.mm have not been compiled; the kernels they
// dispatch are verified on Linux by tests/test_metal_kernels.py (docs/METAL.md).
//
// One Device per process holds the MTLDevice, its queue and the compiled kernels; weights are
// zero-copy MTLBuffers over the mapped file's data section; the KV cache and activations are GPU
// buffers; a forward pass (graph.h) records all its launches into one command buffer
// (begin() ... end()). What to launch is decided by the portable ops.h / graph.h, tested on Linux.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "backend.h"

namespace upg::metal {

class Device : public Gpu {
 public:
  // Opens the system default GPU and loads the kernels from `metallib` (built with the package);
  // when that file is missing, compiles the sources in `source_dir` (metal/*.metal) instead.
  // Throws std::runtime_error when there is no Metal device or neither loads.
  static std::unique_ptr<Device> open(const std::string& metallib, const std::string& source_dir);
  ~Device() override;

  // A buffer over [data, data + bytes) without copying. data must be 16 KiB aligned and bytes a
  // multiple of 16 KiB (the UPG data section is both); the memory must outlive the Device.
  Buf wrap(const void* data, size_t bytes) override;
  // A new zero-filled shared buffer (KV cache, activations).
  Buf alloc(size_t bytes) override;
  // CPU address of a shared buffer range (read logits, write token ids).
  void* contents(Buf b) override;

  // Records every following launch into one command buffer; end() commits it and waits, throwing
  // std::runtime_error when the GPU reports an error.
  void begin() override;
  void end() override;

  // One launch (ops.h): pipeline, buffers (a dummy where id is -1), argument bytes, threadgroup
  // memory, dispatchThreadgroups.
  void dispatch(const Launch& launch) override;

 private:
  struct Impl;
  explicit Device(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace upg::metal
