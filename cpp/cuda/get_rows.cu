// Embedding lookup: out[t][k] = W[ids[t]][k] (+ the row's outliers) for any UPG type. One block
// per token; its threads stride the columns, then (after a barrier, so the dense values are in
// place) the row's CSR entries, whose columns are distinct. An id outside [0, rows) gives zeros.
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {

namespace {

using namespace dev;

constexpr int kThreads = 256;

template <int DT, int B>
__global__ void __launch_bounds__(kThreads) k_get_rows(MatView m, const int32_t* __restrict__ ids, float* __restrict__ out,
                                                      const int32_t* __restrict__ pass) {
  pdl_enter();
  const int t = blockIdx.x;
  if (t >= n_tokens(pass)) return;
  const int r = ids[t];
  const bool valid = r >= 0 && r < m.rows;
  float* o = out + int64_t(t) * m.cols;
  for (int k = threadIdx.x; k < m.cols; k += kThreads) o[k] = valid ? elem<DT, B>(m, r, k) : 0.0f;
  if (!valid || m.rowptr == nullptr) return;
  __syncthreads();
  for (int i = m.rowptr[r] + threadIdx.x; i < m.rowptr[r + 1]; i += kThreads) o[m.col[i]] += f16(m.val[i]);
}

using GetRowsKernel = void (*)(MatView, const int32_t*, float*, const int32_t*);

GetRowsKernel pick(const Weight& w) {
  const int B = w.args.block;
  switch (w.dtype) {
    case UPG_DTYPE_F32: return k_get_rows<UPG_DTYPE_F32, 0>;
    case UPG_DTYPE_F16: return k_get_rows<UPG_DTYPE_F16, 0>;
    case UPG_DTYPE_BF16: return k_get_rows<UPG_DTYPE_BF16, 0>;
    case UPG_DTYPE_Q8_0: return B == 32 ? k_get_rows<UPG_DTYPE_Q8_0, 32> : k_get_rows<UPG_DTYPE_Q8_0, 64>;
    case UPG_DTYPE_Q4: return B == 32 ? k_get_rows<UPG_DTYPE_Q4, 32> : k_get_rows<UPG_DTYPE_Q4, 64>;
    case UPG_DTYPE_Q3: return B == 32 ? k_get_rows<UPG_DTYPE_Q3, 32> : k_get_rows<UPG_DTYPE_Q3, 64>;
    case UPG_DTYPE_IQ4_NL: return k_get_rows<UPG_DTYPE_IQ4_NL, 32>;  // the grid types: block 32 (check_weight)
    case UPG_DTYPE_IQ4_XS: return k_get_rows<UPG_DTYPE_IQ4_XS, 32>;
    default: return k_get_rows<UPG_DTYPE_IQ3, 32>;
  }
}

}  // namespace

void get_rows(const Weight& w, const int32_t* ids, float* out, const int32_t* pass, cudaStream_t s) {
  check_weight(w, "get_rows");
  if (w.args.n_tokens < 1) throw std::invalid_argument("cuda get_rows: bad n_tokens");
  launch("get_rows", pick(w), w.args.n_tokens, kThreads, 0, s, view(w), ids, out, pass);
}

}  // namespace upg::cuda
