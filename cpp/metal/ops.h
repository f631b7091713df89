// The Metal backend's ops as kernel launches. Portable C++: an op records what to dispatch (the
// kernel, its buffers, argument bytes, threadgroup memory, geometry) and hands it to an Encoder.
// On Apple the Encoder is the GPU (metal_backend.mm); in the tests it is a recorder whose launches
// run on the CPU harness, so the geometry and the whole forward pass (graph.h) are tested on Linux.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "upg/quant.h"
#include "upg_quant.h"  // metal/: the kernels' constants and argument structs

namespace upg::metal {

// A range of one buffer: id is the Encoder's handle (-1: none), offset in bytes.
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

// One dispatchThreadgroups:threadsPerThreadgroup: with its bindings.
struct Launch {
  std::string kernel;
  std::vector<std::pair<int, Buf>> buffers;  // [[buffer(i)]] -> range; id -1: declared, not read
  int args_index = -1;                       // [[buffer(i)]] of the constant argument struct
  std::vector<uint8_t> args;                 // its bytes
  std::vector<uint32_t> tgmem;               // threadgroup memory 0, 1, ... in bytes (multiples of 16)
  std::array<uint32_t, 3> groups{1, 1, 1};
  uint32_t threads = 1;
};

class Encoder {
 public:
  virtual ~Encoder() = default;
  virtual void dispatch(const Launch& launch) = 0;
};

// One method per kernel family; metal/*.metal documents each kernel and its dispatch.
class Ops {
 public:
  explicit Ops(Encoder& encoder) : enc_(encoder) {}

  void matvec(const Matrix& w, Buf x, Buf y);
  void matmul(const Matrix& w, Buf x, int n_tokens, Buf y, int ldy);
  void get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out);
  void rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps);
  void rope(Buf qkv, Buf factors, const UpgRopeArgs& args);  // factors.id -1: none
  // KV cache (f16 or f32) of one layer: append the tokens' K and V, then attend.
  void kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args);
  void attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, bool prefill, const UpgAttnArgs& args);
  void silu_mul(Buf gate_up, Buf out, int n_tokens, int n, int in_stride);
  void add(Buf x, Buf y, int n);  // x += y
  void argmax(Buf x, int n, Buf out);

 private:
  Encoder& enc_;
};

}  // namespace upg::metal
