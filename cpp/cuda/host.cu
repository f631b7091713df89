// Host-side helpers shared by the launchers (common.cuh) and init(), and DeviceScratch.
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "upg/quant.h"

namespace upg::cuda {

namespace {
int g_sms = 0;
int g_smem_optin = 0;
int g_pdl = -1;  // -1: not decided yet
}

void set_programmatic_launch(bool on) { g_pdl = on ? 1 : 0; }

bool programmatic_launch() {
  if (g_pdl < 0) {
    int dev = 0, major = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
    g_pdl = major >= 9 ? 1 : 0;
  }
  return g_pdl == 1;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("cuda: ") + what + ": " + cudaGetErrorString(e));
}

int sm_count() {
  if (g_sms == 0) {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev), "multiprocessor count");
  }
  return g_sms;
}

int max_smem_optin() {
  if (g_smem_optin == 0) {
    int dev = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&g_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "shared memory limit");
  }
  return g_smem_optin;
}

void allow_max_smem(const void* kernel) {
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, kernel), "kernel attributes");
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_optin() - int(attr.sharedSizeBytes)),
        "shared memory limit");
}

void check_weight(const Weight& w, const char* what) {
  const UpgMatArgs& a = w.args;
  const bool dense = w.dtype == UPG_DTYPE_F32 || w.dtype == UPG_DTYPE_F16 || w.dtype == UPG_DTYPE_BF16;
  const bool quant = w.dtype >= 0 && w.dtype < kNumDTypes && w.dtype != UPG_DTYPE_I32 && !dense;
  if (!dense && !quant)  // i32 tensors are no weights; other codes are no UPG type
    throw std::invalid_argument(std::string("cuda ") + what + ": dtype " + std::to_string(w.dtype) +
                                " is not a weight type the CUDA kernels run");
  if (a.rows < 1 || a.cols < 1) throw std::invalid_argument(std::string("cuda ") + what + ": bad shape");
  if (quant)  // the format's rules for the type (upg/quant.h): block sizes, whole blocks and super-blocks
    if (const char* e = quant_shape_error(DType(w.dtype), uint64_t(a.cols), a.block))
      throw std::invalid_argument(std::string("cuda ") + what + ": " + e);
  if (w.data == nullptr) throw std::invalid_argument(std::string("cuda ") + what + ": no weight data");
  if (a.has_outliers && (!w.rowptr || !w.col || !w.val))
    throw std::invalid_argument(std::string("cuda ") + what + ": outliers flagged but not bound");
}

dev::MatView view(const Weight& w) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  dev::MatView m;
  m.codes = base;
  m.high = base + w.args.high_offset;
  m.sub = base + w.args.sub_offset;
  m.scales = reinterpret_cast<const uint16_t*>(base + w.args.scales_offset);
  m.rows = w.args.rows;
  m.cols = w.args.cols;
  m.block = w.args.block;
  m.rowptr = w.args.has_outliers ? w.rowptr : nullptr;
  m.col = w.col;
  m.val = w.val;
  return m;
}

Weight make_weight(int dtype, int rows, int cols, int block, const void* data, int n_tokens,
                   const int32_t* rowptr, const int32_t* col, const uint16_t* val) {
  Weight w;
  w.dtype = dtype;
  w.data = data;
  w.rowptr = rowptr;
  w.col = col;
  w.val = val;
  UpgMatArgs& a = w.args;
  a.rows = rows;
  a.cols = cols;
  const bool quantized = is_quantized(DType(dtype));
  a.block = quantized ? block : 0;
  if (quantized && block > 0) {  // the sections' offsets as the format defines them (upg/quant.h)
    const QuantSections q = quant_sections(DType(dtype), uint64_t(rows), uint64_t(cols), uint64_t(block));
    a.high_offset = uint32_t(q.high_offset());
    a.scales_offset = uint32_t(q.scales_offset());
    a.sub_offset = uint32_t(q.sub_offset());
  }
  a.has_outliers = rowptr != nullptr;
  a.n_tokens = n_tokens;
  a.ldy = rows;
  return w;
}

void init_matvec();
void init_matmul();
void init_attention();

void init(int device) {
  check(cudaSetDevice(device), "cudaSetDevice");
  g_sms = 0;
  g_smem_optin = 0;
  sm_count();
  if (g_pdl < 0) programmatic_launch();
  init_matvec();
  init_matmul();
  init_attention();
}

void* DeviceScratch::need(size_t bytes) {
  if (bytes > bytes_) {
    if (p_) check(cudaFree(p_), "cudaFree");  // waits for the queued work that may use the old one
    p_ = nullptr;
    bytes_ = 0;
    check(cudaMalloc(&p_, bytes), "cudaMalloc");
    bytes_ = bytes;
  }
  return p_;
}

DeviceScratch::~DeviceScratch() {
  if (p_) cudaFree(p_);
}

}  // namespace upg::cuda
