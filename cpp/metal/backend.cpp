// The launches of the Metal ops (backend.h). Geometry and bindings must match the comment at the top
// of each metal/*.metal file; tests/test_metal_kernels.py runs these launches on the CPU harness.
#include "metal/backend.h"

#include <cstring>
#include <stdexcept>

namespace upg::metal {

namespace {

uint32_t round16(uint64_t n) { return uint32_t((n + 15) & ~uint64_t(15)); }
uint32_t ceil_div(int64_t a, int64_t b) { return uint32_t((a + b - 1) / b); }

std::string suffix(const Matrix& w) {
  std::string s = dtype_name(w.type);
  if (is_quantized(w.type)) s += "_b" + std::to_string(w.block);
  return s;
}

template <class Args>
void set_args(Launch& l, int index, const Args& a) {
  l.args_index = index;
  l.args.resize(sizeof(Args));
  std::memcpy(l.args.data(), &a, sizeof(Args));
}

// A kernel of one thread per element (n x n_tokens of them): buffers 0 and 1, arguments 2.
Launch elementwise_launch(const char* kernel, Buf a, Buf b, const UpgEltArgs& args) {
  Launch l;
  l.kernel = kernel;
  l.buffers = {{0, a}, {1, b}};
  set_args(l, 2, args);
  l.groups = {ceil_div(int64_t(args.n) * args.n_tokens, 256), 1, 1};
  l.threads = 256;
  return l;
}

// A matrix kernel's bindings: weights 0, x 1, y 2, outliers 3-5, arguments 6.
Launch matrix_launch(const std::string& name, const Matrix& w, Buf x, Buf y, int n_tokens, int ldy) {
  Launch l;
  l.kernel = name + suffix(w);
  l.buffers = {{0, w.data}, {1, x}, {2, y}, {3, w.rowptr}, {4, w.col}, {5, w.val}};
  UpgMatArgs a{};
  a.rows = int32_t(w.rows);
  a.cols = int32_t(w.cols);
  a.block = w.block;
  if (is_quantized(w.type)) {
    const QuantSections s = quant_sections(w.type, uint64_t(w.rows), uint64_t(w.cols), uint64_t(w.block));
    a.high_offset = uint32_t(s.high_offset());
    a.scales_offset = uint32_t(s.scales_offset());
    a.sub_offset = uint32_t(s.sub_offset());
  }
  a.has_outliers = w.has_outliers();
  a.n_tokens = n_tokens;
  a.ldy = ldy;
  set_args(l, 6, a);
  return l;
}

}  // namespace

void MetalBackend::upload(Buf dst, const void* src, size_t bytes) { std::memcpy(gpu_->contents(dst), src, bytes); }
void MetalBackend::download(void* dst, Buf src, size_t bytes) { std::memcpy(dst, gpu_->contents(src), bytes); }

// Generated rows by the mat-vec kernel, one launch per token; prompt rows by the mat-mat kernel,
// however few: each row's sums never depend on how many tokens the call holds (batch invariance;
// a mat-vec kernel of several tokens would read the weights once for all of them).
void MetalBackend::linear(const Matrix& w, Buf x, int n_tokens, int n_decode, Buf y) {
  const uint64_t x_row = 4 * uint64_t(w.cols), y_row = 4 * uint64_t(w.rows);
  for (int t = 0; t < n_decode; ++t) {
    Launch l = matrix_launch("kernel_matvec_", w, x.at(t * x_row), y.at(t * y_row), 1, int(w.rows));
    l.groups = {ceil_div(w.rows, UPG_MV_SG * UPG_MV_ROWS), 1, 1};
    l.threads = UPG_MV_SG * UPG_SIMD_WIDTH;
    gpu_->dispatch(l);
  }
  const int n = n_tokens - n_decode;
  if (n <= 0) return;
  Launch l = matrix_launch("kernel_matmul_", w, x.at(n_decode * x_row), y.at(n_decode * y_row), n, int(w.rows));
  l.tgmem = {round16(4 * UPG_MM_TK * UPG_MM_TM), round16(4 * UPG_MM_TN * UPG_MM_TK),
             round16(4 * UPG_MM_TN * UPG_MM_TM)};
  l.groups = {ceil_div(w.rows, UPG_MM_TM), ceil_div(n, UPG_MM_TN), 1};
  l.threads = UPG_MM_SG * UPG_SIMD_WIDTH;
  gpu_->dispatch(l);
}

void MetalBackend::get_rows(const Matrix& w, Buf ids, int n_tokens, Buf out) {
  Launch l = matrix_launch("kernel_get_rows_", w, ids, out, n_tokens, 0);
  l.groups = {uint32_t(n_tokens), 1, 1};
  l.threads = UPG_REDUCE_THREADS;
  gpu_->dispatch(l);
}

void MetalBackend::rms_norm(Buf x, Buf weight, Buf out, int n_tokens, int n, float eps) {
  Launch l;
  l.kernel = "kernel_rms_norm";
  l.buffers = {{0, x}, {1, weight}, {2, out}};
  set_args(l, 3, UpgNormArgs{n, eps});
  l.tgmem = {round16(4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH)};
  l.groups = {uint32_t(n_tokens), 1, 1};
  l.threads = UPG_REDUCE_THREADS;
  gpu_->dispatch(l);
}

void MetalBackend::rope(Buf qkv, Buf inv_freq, const UpgRopeArgs& args) {
  Launch l;
  l.kernel = "kernel_rope";
  l.buffers = {{0, qkv}, {1, inv_freq}, {2, pass_}};
  set_args(l, 3, args);
  l.groups = {ceil_div(args.rot_dims / 2, 32), uint32_t(args.n_heads), uint32_t(args.n_tokens)};
  l.threads = 32;
  gpu_->dispatch(l);
}

void MetalBackend::kv_store(Buf qkv, Buf k_cache, Buf v_cache, bool f16, const UpgAttnArgs& args) {
  Launch l;
  l.kernel = f16 ? "kernel_kv_store_f16" : "kernel_kv_store_f32";
  l.buffers = {{0, qkv}, {1, k_cache}, {2, v_cache}, {3, pass_}};
  set_args(l, 4, args);
  l.groups = {ceil_div(args.head_dim, 32), uint32_t(args.n_kv_heads), uint32_t(args.n_tokens)};
  l.threads = 32;
  gpu_->dispatch(l);
}

void MetalBackend::attention(Buf qkv, Buf k_cache, Buf v_cache, Buf out, bool f16, const UpgAttnArgs& args) {
  if (args.head_dim % UPG_SIMD_WIDTH != 0 || args.head_dim > UPG_ATTN_MAX_HEAD_DIM)
    throw std::runtime_error("metal: head_dim must be a multiple of 32, at most 256");
  Launch l;
  l.kernel = std::string("kernel_attn_") + (f16 ? "f16" : "f32");
  l.buffers = {{0, qkv}, {1, k_cache}, {2, v_cache}, {3, out}, {4, pass_}};
  set_args(l, 5, args);
  l.tgmem = {round16(4 * UPG_ATTN_SG * (args.head_dim + 2))};
  l.groups = {uint32_t(args.n_heads), uint32_t(args.n_tokens), 1};
  l.threads = UPG_ATTN_SG * UPG_SIMD_WIDTH;
  gpu_->dispatch(l);
}

void MetalBackend::silu_mul(Buf gate_up, Buf out, int n_tokens, int n) {
  gpu_->dispatch(elementwise_launch("kernel_silu_mul", gate_up, out, UpgEltArgs{n, n_tokens, 2 * n}));
}

void MetalBackend::add(Buf x, Buf y, int n) { gpu_->dispatch(elementwise_launch("kernel_add", x, y, UpgEltArgs{n, 1, 0})); }

void MetalBackend::argmax(Buf x, int n, Buf out) {
  Launch l;
  l.kernel = "kernel_argmax";
  l.buffers = {{0, x}, {1, out}};
  set_args(l, 2, UpgEltArgs{n, 1, 0});
  l.tgmem = {round16(4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH), round16(4 * UPG_REDUCE_THREADS / UPG_SIMD_WIDTH)};
  l.groups = {1, 1, 1};
  l.threads = UPG_REDUCE_THREADS;
  gpu_->dispatch(l);
}

void MetalBackend::next_token(Buf pass, Buf tokens, Buf out) {
  Launch l;
  l.kernel = "kernel_next_token";
  l.buffers = {{0, pass}, {1, tokens}, {2, out}};
  l.groups = {1, 1, 1};
  l.threads = 1;
  gpu_->dispatch(l);
}

}  // namespace upg::metal
