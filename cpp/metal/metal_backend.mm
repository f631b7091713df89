// Metal host code (see metal_backend.h). NEVER COMPILED OR RUN: written without a Mac; the
// kernels it dispatches are verified on Linux by tests/test_metal_kernels.py. Dispatch geometry
// here must match the comments at the top of each metal/*.metal file and the tests' launches.
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include "metal_backend.h"

#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace upg::metal {

namespace {

// The kernel source files, in the order they are concatenated for the compile-from-source path.
const char* const kSources[] = {"argmax.metal", "attention.metal", "elementwise.metal",
                                "get_rows.metal", "matmul.metal", "matvec.metal",
                                "rms_norm.metal", "rope.metal"};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("metal: cannot read " + path);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// A .metal file with its `#include "upg_*.h"` lines replaced by the headers (each once):
// newLibraryWithSource has no include path.
void inline_includes(const std::string& dir, const std::string& text, std::set<std::string>& seen,
                     std::string& out) {
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const auto q = line.find("#include \"");
    if (q == std::string::npos) {
      if (line.find("#pragma once") == std::string::npos) out += line + "\n";
      continue;
    }
    const auto end = line.find('"', q + 10);
    const std::string name = line.substr(q + 10, end - q - 10);
    if (seen.insert(name).second) inline_includes(dir, read_file(dir + "/" + name), seen, out);
  }
}

std::string dtype_suffix(const Matrix& w) {
  std::string s = dtype_name(w.type);
  if (is_quantized(w.type)) s += "_b" + std::to_string(w.block);
  return s;
}

uint64_t round16(uint64_t n) { return (n + 15) & ~uint64_t(15); }

}  // namespace

struct Device::Impl {
  id<MTLDevice> device = nil;
  id<MTLCommandQueue> queue = nil;
  id<MTLLibrary> library = nil;
  std::vector<id<MTLBuffer>> buffers;  // Buf::id indexes this
  std::unordered_map<std::string, id<MTLComputePipelineState>> pipelines;
  id<MTLCommandBuffer> cmd = nil;
  id<MTLComputeCommandEncoder> enc = nil;
  Buf dummy;  // bound where a kernel declares a buffer it will not read (no outliers, no factors)

  id<MTLComputePipelineState> pipeline(const std::string& name) {
    auto it = pipelines.find(name);
    if (it != pipelines.end()) return it->second;
    id<MTLFunction> fn = [library newFunctionWithName:[NSString stringWithUTF8String:name.c_str()]];
    if (fn == nil) throw std::runtime_error("metal: no kernel " + name);
    NSError* err = nil;
    id<MTLComputePipelineState> p = [device newComputePipelineStateWithFunction:fn error:&err];
    if (p == nil) throw std::runtime_error("metal: pipeline " + name + ": " + err.localizedDescription.UTF8String);
    return pipelines[name] = p;
  }

  id<MTLComputeCommandEncoder> encoder(const std::string& kernel) {
    if (enc == nil) throw std::runtime_error("metal: op recorded outside begin()/end()");
    [enc setComputePipelineState:pipeline(kernel)];
    return enc;
  }

  void bind(int index, Buf b) {
    const Buf use = b.id < 0 ? dummy : b;
    [enc setBuffer:buffers.at(use.id) offset:use.offset atIndex:index];
  }

  template <class Args> void bind_args(int index, const Args& a) {
    [enc setBytes:&a length:sizeof(Args) atIndex:index];
  }

  void tgmem(int index, uint64_t bytes) {
    [enc setThreadgroupMemoryLength:round16(bytes) atIndex:index];
  }

  void dispatch(MTLSize groups, NSUInteger threads) {
    [enc dispatchThreadgroups:groups threadsPerThreadgroup:MTLSizeMake(threads, 1, 1)];
  }

  UpgMatArgs mat_args(const Matrix& w, int n_tokens, int ldy) const {
    UpgMatArgs a{};
    a.rows = int32_t(w.rows);
    a.cols = int32_t(w.cols);
    a.block = w.block;
    if (is_quantized(w.type)) {
      const QuantSections s = quant_sections(w.type, w.rows, w.cols, w.block);
      a.high_offset = uint32_t(s.high_offset());
      a.scales_offset = uint32_t(s.scales_offset());
    }
    a.has_outliers = w.rowptr.id >= 0;
    a.n_tokens = n_tokens;
    a.ldy = ldy;
    return a;
  }

  void bind_matrix(const Matrix& w) {
    bind(0, w.data);
    bind(3, w.rowptr);
    bind(4, w.col);
    bind(5, w.val);
  }
};

Device::Device(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Device::~Device() = default;

std::unique_ptr<Device> Device::open(const std::string& metallib, const std::string& source_dir) {
  auto impl = std::make_unique<Impl>();
  impl->device = MTLCreateSystemDefaultDevice();
  if (impl->device == nil) throw std::runtime_error("metal: no Metal device");
  if (![impl->device supportsFamily:MTLGPUFamilyApple7])  // simdgroup_matrix: M1 / A14 and later
    throw std::runtime_error("metal: the GPU lacks simdgroup matrices (needs Apple GPU family 7)");
  impl->queue = [impl->device newCommandQueue];
  NSError* err = nil;
  NSString* lib_path = [NSString stringWithUTF8String:metallib.c_str()];
  if ([[NSFileManager defaultManager] fileExistsAtPath:lib_path]) {
    impl->library = [impl->device newLibraryWithURL:[NSURL fileURLWithPath:lib_path] error:&err];
  } else {
    std::string all;
    std::set<std::string> seen;
    for (const char* name : kSources)
      inline_includes(source_dir, read_file(source_dir + "/" + name), seen, all);
    MTLCompileOptions* opts = [MTLCompileOptions new];
    opts.languageVersion = MTLLanguageVersion2_4;
    impl->library = [impl->device newLibraryWithSource:[NSString stringWithUTF8String:all.c_str()]
                                               options:opts
                                                 error:&err];
  }
  if (impl->library == nil)
    throw std::runtime_error(std::string("metal: cannot load the kernels: ") +
                             (err ? err.localizedDescription.UTF8String : "unknown error"));
  std::unique_ptr<Device> dev(new Device(std::move(impl)));
  dev->impl_->dummy = dev->alloc(16);
  return dev;
}

Buf Device::wrap(const void* data, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(data) % kDataAlign != 0 || bytes % kDataAlign != 0)
    throw std::runtime_error("metal: weights must be 16 KiB aligned and sized");
  if (bytes > impl_->device.maxBufferLength)
    throw std::runtime_error("metal: the weights exceed this GPU's largest buffer");
  id<MTLBuffer> b = [impl_->device newBufferWithBytesNoCopy:const_cast<void*>(data)
                                                     length:bytes
                                                    options:MTLResourceStorageModeShared
                                                deallocator:nil];
  if (b == nil) throw std::runtime_error("metal: cannot wrap the mapped weights");
  impl_->buffers.push_back(b);
  return Buf{int(impl_->buffers.size()) - 1, 0};
}

Buf Device::alloc(size_t bytes) {
  id<MTLBuffer> b = [impl_->device newBufferWithLength:bytes options:MTLResourceStorageModeShared];
  if (b == nil) throw std::runtime_error("metal: out of GPU memory");
  std::memset(b.contents, 0, bytes);
  impl_->buffers.push_back(b);
  return Buf{int(impl_->buffers.size()) - 1, 0};
}

void* Device::contents(Buf b) {
  return static_cast<char*>(impl_->buffers.at(b.id).contents) + b.offset;
}

void Device::begin() {
  impl_->cmd = [impl_->queue commandBuffer];
  impl_->enc = [impl_->cmd computeCommandEncoder];  // serial: each dispatch sees the previous
}

void Device::end() {
  [impl_->enc endEncoding];
  [impl_->cmd commit];
  [impl_->cmd waitUntilCompleted];
  NSError* err = impl_->cmd.error;
  impl_->enc = nil;
  impl_->cmd = nil;
  if (err != nil) throw std::runtime_error(std::string("metal: ") + err.localizedDescription.UTF8String);
}

void Device::matvec(const Matrix& w, Buf x, Buf y) {
  Impl& m = *impl_;
  m.encoder("kernel_matvec_" + dtype_suffix(w));
  m.bind_matrix(w);
  m.bind(1, x);
  m.bind(2, y);
  m.bind_args(6, m.mat_args(w, 1, int(w.rows)));
  const int per_group = UPG_MV_SG * UPG_MV_ROWS;
  m.dispatch(MTLSizeMake((w.rows + per_group - 1) / per_group, 1, 1), UPG_MV_SG * UPG_SIMD_WIDTH);
}

void Device::matmul(const Matrix& w, Buf x, int n_tokens, Buf y, int ldy) {
  Impl& m = *impl_;
  m.encoder("kernel_matmul_" + dtype_suffix(w));
  m.bind_matrix(w);
  m.bind(1, x);
  m.bind(2, y);
  m.bind_args(6, m.mat_args(w, n_tokens, ldy));
  m.tgmem(0, 4 * UPG_MM_TK * UPG_MM_TM);
  m.tgmem(1, 4 * UPG_MM_TN * UPG_MM_TK);
  m.tgmem(2, 4 * UPG_MM_TN * UPG_MM_TM);
  m.dispatch(MTLSizeMake((w.rows + UPG_MM_TM - 1) / UPG_MM_TM, (n_tokens + UPG_MM_TN - 1) / UPG_MM_TN, 1),
             UPG_MM_SG * UPG_SIMD_WIDTH);
}

void Device::get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) {
  Impl& m = *impl_;
  m.encoder("kernel_get_rows_" + dtype_suffix(w));
  m.bind_matrix(w);
  m.bind(1, ids);
  m.bind(2, out);
  m.bind_args(6, m.mat_args(w, n_tokens, 0));
  m.dispatch(MTLSizeMake(n_tokens, 1, 1), UPG_REDUCE_THREADS);
}

void Device::rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) {
  Impl& m = *impl_;
  m.encoder("kernel_rms_norm");
  m.bind(0, x);
  m.bind(1, weight);
  m.bind(2, out);
  m.bind_args(3, UpgNormArgs{n, eps});
  m.tgmem(0, 4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH);
  m.dispatch(MTLSizeMake(n_tokens, 1, 1), UPG_REDUCE_THREADS);
}

void Device::rope(Buf qkv, Buf factors, const UpgRopeArgs& args) {
  Impl& m = *impl_;
  m.encoder("kernel_rope");
  m.bind(0, qkv);
  m.bind(1, factors);
  m.bind_args(2, args);
  const int pairs = args.rot_dims / 2;
  m.dispatch(MTLSizeMake((pairs + 31) / 32, args.n_heads, args.n_tokens), 32);
}

void Device::kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) {
  Impl& m = *impl_;
  m.encoder(f16 ? "kernel_kv_store_f16" : "kernel_kv_store_f32");
  m.bind(0, qkv);
  m.bind(1, k_cache);
  m.bind(2, v_cache);
  m.bind_args(3, args);
  m.dispatch(MTLSizeMake((args.head_dim + 31) / 32, args.n_kv_heads, args.n_tokens), 32);
}

void Device::attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, bool prefill,
                       const UpgAttnArgs& args) {
  if (args.head_dim % UPG_SIMD_WIDTH != 0 || args.head_dim > UPG_ATTN_MAX_HEAD_DIM)
    throw std::runtime_error("metal: head_dim must be a multiple of 32, at most 256");
  Impl& m = *impl_;
  m.encoder(std::string("kernel_attn_") + (prefill ? "prefill_" : "decode_") + (f16 ? "f16" : "f32"));
  m.bind(0, qkv);
  m.bind(1, k_cache);
  m.bind(2, v_cache);
  m.bind(3, out);
  m.bind_args(4, args);
  m.tgmem(0, 4 * UPG_ATTN_SG * (args.head_dim + 2));
  m.dispatch(MTLSizeMake(args.n_heads, prefill ? args.n_tokens : 1, 1), UPG_ATTN_SG * UPG_SIMD_WIDTH);
}

void Device::silu_mul(Buf gate_up, Buf out, int n_tokens, int n, int in_stride) {
  Impl& m = *impl_;
  m.encoder("kernel_silu_mul");
  m.bind(0, gate_up);
  m.bind(1, out);
  m.bind_args(2, UpgEltArgs{n, n_tokens, in_stride});
  m.dispatch(MTLSizeMake((int64_t(n) * n_tokens + 255) / 256, 1, 1), 256);
}

void Device::add(Buf x, Buf y, int n) {
  Impl& m = *impl_;
  m.encoder("kernel_add");
  m.bind(0, x);
  m.bind(1, y);
  m.bind_args(2, UpgEltArgs{n, 1, 0});
  m.dispatch(MTLSizeMake((n + 255) / 256, 1, 1), 256);
}

void Device::argmax(Buf x, int n, Buf out) {
  Impl& m = *impl_;
  m.encoder("kernel_argmax");
  m.bind(0, x);
  m.bind(1, out);
  m.bind_args(2, UpgEltArgs{n, 1, 0});
  m.tgmem(0, 4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH);
  m.tgmem(1, 4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH);
  m.dispatch(MTLSizeMake(1, 1, 1), UPG_REDUCE_THREADS);
}

}  // namespace upg::metal
