// A C ABI over the CUDA launchers (cpp/cuda/kernels.cuh) for the GPU tests and benchmarks, loaded
// with ctypes: flat arguments, device pointers as integers, 0 on success or -1 with the message in
// upg_cuda_last_error(). Not part of the package.
#include <exception>
#include <string>

#include "kernels.cuh"

namespace {

thread_local std::string g_error;

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
    return -1;
  }
}

cudaStream_t st(void* s) { return static_cast<cudaStream_t>(s); }

UpgAttnArgs attn_args(int nh, int nkv, int hd, int kv_stride, int q_stride, int capacity, float scale, int n_decode = 0,
                      int n_seqs = 1, int slot_len = 0) {
  UpgAttnArgs a{};
  a.n_decode = n_decode;
  a.n_seqs = n_seqs;
  a.slot_len = slot_len > 0 ? slot_len : kv_stride;
  a.n_heads = nh;
  a.n_kv_heads = nkv;
  a.head_dim = hd;
  a.kv_stride = kv_stride;
  a.q_stride = q_stride;
  a.n_tokens = capacity;
  a.scale = scale;
  return a;
}

}  // namespace

using namespace upg::cuda;

extern "C" {

const char* upg_cuda_last_error() { return g_error.c_str(); }

int upg_cuda_init(int device) { return guarded([&] { init(device); }); }

int upg_set_programmatic_launch(int on) { return guarded([&] { set_programmatic_launch(on != 0); }); }

int upg_matvec(int dtype, int rows, int cols, int block, const void* w, const int32_t* rowptr, const int32_t* col,
               const uint16_t* val, const float* x, float* y, const float* norm_w, float eps, int silu, int accumulate,
               void* s) {
  return guarded([&] {
    MatvecFuse f;
    f.norm_weight = norm_w;
    f.eps = eps;
    f.silu_mul = silu != 0;
    f.accumulate = accumulate != 0;
    matvec(make_weight(dtype, rows, cols, block, w, 1, rowptr, col, val), x, y, st(s), f);
  });
}

int upg_matmul(int dtype, int rows, int cols, int block, const void* w, const int32_t* rowptr, const int32_t* col,
               const uint16_t* val, const float* x, float* y, int capacity, int ldy, const int32_t* pass,
               void* scratch, void* s) {
  return guarded([&] {
    Weight wt = make_weight(dtype, rows, cols, block, w, capacity, rowptr, col, val);
    wt.args.ldy = ldy;
    matmul(wt, x, y, pass, st(s), scratch);
  });
}

int upg_matvec_n(int dtype, int rows, int cols, int block, const void* w, const int32_t* rowptr, const int32_t* col,
                 const uint16_t* val, const float* x, float* y, int n, void* s) {
  return guarded([&] { matvec_n(make_weight(dtype, rows, cols, block, w, 1, rowptr, col, val), x, y, n, st(s)); });
}

int upg_matvec_tokens(int dtype, int rows, int cols, int block) {
  return matvec_tokens(make_weight(dtype, rows, cols, block, nullptr));
}

size_t upg_matmul_scratch(int dtype, int rows, int cols, int block, int capacity) {
  return matmul_scratch(make_weight(dtype, rows, cols, block, nullptr, capacity));
}

int upg_get_rows(int dtype, int rows, int cols, int block, const void* w, const int32_t* rowptr, const int32_t* col,
                 const uint16_t* val, const int32_t* ids, float* out, int capacity, const int32_t* pass, void* s) {
  return guarded([&] { get_rows(make_weight(dtype, rows, cols, block, w, capacity, rowptr, col, val), ids, out, pass, st(s)); });
}

int upg_rms_norm(const float* x, const float* w, float* out, int n, float eps, int capacity, int last_only,
                 const int32_t* pass, void* s) {
  return guarded([&] { rms_norm(x, w, out, UpgNormArgs{n, eps}, capacity, last_only != 0, pass, st(s)); });
}

int upg_rope(float* qkv, const float* inv_freq, int capacity, int n_heads, int head_dim, int rot_dims, int token_stride,
             float attn_factor, const int32_t* pass, void* s) {
  return guarded([&] {
    UpgRopeArgs a{};
    a.n_tokens = capacity;
    a.n_heads = n_heads;
    a.head_dim = head_dim;
    a.rot_dims = rot_dims;
    a.token_stride = token_stride;
    a.attn_factor = attn_factor;
    rope(qkv, inv_freq, a, pass, st(s));
  });
}

int upg_kv_store(const float* qkv, void* kc, void* vc, int f16, int nh, int nkv, int hd, int kv_stride, int q_stride,
                 int capacity, const int32_t* pass, void* s) {
  return guarded([&] { kv_store(qkv, kc, vc, f16 != 0, attn_args(nh, nkv, hd, kv_stride, q_stride, capacity, 0.0f), pass, st(s)); });
}

size_t upg_decode_workspace(int nh, int nkv, int hd, int kv_stride, int slot_len, int n_decode) {
  return decode_splits(attn_args(nh, nkv, hd, kv_stride, 0, n_decode, 0.0f, n_decode, 1, slot_len)).workspace;
}

// n_decode generated tokens, the pass's first (capacity n_decode).
int upg_attention_decode(const float* qkv, const void* kc, const void* vc, float* out, int f16, int nh, int nkv, int hd,
                         int kv_stride, int slot_len, int q_stride, int n_decode, float scale, float* ws,
                         const int32_t* pass, void* s) {
  return guarded([&] {
    attention_decode(qkv, kc, vc, out, f16 != 0,
                     attn_args(nh, nkv, hd, kv_stride, q_stride, n_decode, scale, n_decode, n_decode, slot_len), ws,
                     pass, st(s));
  });
}

// The prompt tokens of a pass of `capacity` tokens, n_decode generated ones first, n_seqs sequences.
int upg_attention_prefill(const float* qkv, const void* kc, const void* vc, float* out, int f16, int nh, int nkv, int hd,
                          int kv_stride, int slot_len, int q_stride, int capacity, int n_decode, int n_seqs, float scale,
                          const int32_t* pass, void* s) {
  return guarded([&] {
    attention_prefill(qkv, kc, vc, out, f16 != 0,
                      attn_args(nh, nkv, hd, kv_stride, q_stride, capacity, scale, n_decode, n_seqs, slot_len), pass,
                      st(s));
  });
}

int upg_silu_mul(const float* in, float* out, int n, int capacity, int in_stride, const int32_t* pass, void* s) {
  return guarded([&] { silu_mul(in, out, UpgEltArgs{n, capacity, in_stride}, pass, st(s)); });
}

int upg_add(float* x, const float* y, int n, int capacity, const int32_t* pass, void* s) {
  return guarded([&] { add(x, y, UpgEltArgs{n, capacity, 0}, pass, st(s)); });
}

int upg_argmax(const float* x, int n, int32_t* out, void* s) { return guarded([&] { argmax(x, n, out, st(s)); }); }

int upg_next_token(int32_t* pass, const int32_t* token, int32_t* out, void* s) {
  return guarded([&] { next_token(pass, token, out, st(s)); });
}

}  // extern "C"
