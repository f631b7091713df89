// Metal host code (see metal_backend.h). NEVER COMPILED OR RUN: written without a Mac. What it
// dispatches comes from ops.cpp / graph.cpp, whose launches tests/test_metal_kernels.py runs on
// the CPU harness; this file only turns a Launch into Metal calls.
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

void Device::dispatch(const Launch& l) {
  Impl& m = *impl_;
  id<MTLComputeCommandEncoder> enc = m.encoder(l.kernel);
  for (const auto& [index, buf] : l.buffers) m.bind(index, buf);
  if (l.args_index >= 0) [enc setBytes:l.args.data() length:l.args.size() atIndex:NSUInteger(l.args_index)];
  for (size_t i = 0; i < l.tgmem.size(); ++i) [enc setThreadgroupMemoryLength:l.tgmem[i] atIndex:i];
  [enc dispatchThreadgroups:MTLSizeMake(l.groups[0], l.groups[1], l.groups[2])
      threadsPerThreadgroup:MTLSizeMake(l.threads, 1, 1)];
}

}  // namespace upg::metal
