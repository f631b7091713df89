// The sampler's cut on the GPU (Backend::top_k): the k best floats of a logits row in the
// sampler's order (logit descending, then id ascending), and the skipped ids' floats.
//
// Each float becomes one 64-bit key whose unsigned order is that order: the float's bits made
// monotone above (-0 as +0, so the two tie as they compare), the complement of its id below (the
// lower id first on ties). A NaN, -inf or skipped id is key 0, below every drawable one, and key 0
// reads back as id -1. Pass 1: blocks of kChunk floats sort their keys in shared memory (bitonic)
// and keep their k best; pass 2: one block merges those lists kMerge keys at a time (the k best
// so far and the next keys), then writes the ids, their floats read back from the row (a key
// keeps no sign of zero) and the skipped ids' floats.
#include <stdexcept>

#include "common.cuh"

namespace upg::cuda {
namespace {

using namespace dev;

constexpr int kChunk = 2048, kChunkThreads = 256;
constexpr int kMerge = 4096, kMergeThreads = 1024;
static_assert(kTopKMax < kChunk && 2 * kTopKMax <= kMerge, "a block keeps k of its keys; the merge adds to k kept");

__device__ __forceinline__ uint64_t key_of(float x, int32_t id) {
  const uint32_t u = x == 0.0f ? 0u : __float_as_uint(x);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t(ordered) << 32) | ~uint32_t(id);
}

__device__ __forceinline__ bool listed(const int32_t* __restrict__ ids, int n, int32_t id) {  // ids ascending
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ids[mid] < id) lo = mid + 1;
    else hi = mid;
  }
  return lo < n && ids[lo] == id;
}

// Sorts s[0, m) descending (m a power of two) with the whole block; ends synchronized.
__device__ void sort_descending(uint64_t* s, int m) {
  for (int size = 2; size <= m; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < m / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const uint64_t a = s[lo], b = s[hi];
        if ((a < b) == ((lo & size) == 0)) {  // each run of `size` alternates direction; the last is descending
          s[lo] = b;
          s[hi] = a;
        }
      }
    }
  __syncthreads();
}

__global__ void __launch_bounds__(kChunkThreads) k_top_k_chunks(const float* __restrict__ x, int n,
                                                                const int32_t* __restrict__ skip, int n_skip, int k,
                                                                uint64_t* __restrict__ best) {
  pdl_enter();
  __shared__ uint64_t s[kChunk];
  const int base = blockIdx.x * kChunk;
  for (int i = threadIdx.x; i < kChunk; i += blockDim.x) {
    const int id = base + i;
    const float v = id < n ? x[id] : -INFINITY;
    s[i] = v > -INFINITY && !listed(skip, n_skip, id) ? key_of(v, id) : 0;  // NaN fails the comparison
  }
  sort_descending(s, kChunk);
  for (int i = threadIdx.x; i < k; i += blockDim.x) best[int64_t(blockIdx.x) * k + i] = s[i];
}

__global__ void __launch_bounds__(kMergeThreads) k_top_k_merge(const uint64_t* __restrict__ best, int n_best, int k,
                                                               const float* __restrict__ x,
                                                               const int32_t* __restrict__ skip, int n_skip,
                                                               int32_t* __restrict__ ids, float* __restrict__ logits,
                                                               float* __restrict__ skipped) {
  pdl_enter();
  __shared__ uint64_t s[kMerge];
  int have = 0;  // s[0, have): the k best so far, sorted
  for (int done = 0; done < n_best;) {
    const int take = min(n_best - done, kMerge - have), used = have + take;
    int m = 1;
    while (m < used) m <<= 1;
    for (int i = have + threadIdx.x; i < m; i += blockDim.x) s[i] = i < used ? best[done + i - have] : 0;
    sort_descending(s, m);
    done += take;
    have = min(k, used);
  }
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int32_t id = int32_t(~uint32_t(i < have ? s[i] : 0));
    ids[i] = id;
    logits[i] = id >= 0 ? x[id] : 0.0f;
  }
  for (int i = threadIdx.x; i < n_skip; i += blockDim.x) skipped[i] = x[skip[i]];
}

int chunks(int n) { return (n + kChunk - 1) / kChunk; }

}  // namespace

size_t top_k_scratch(int n, int k) { return size_t(chunks(n)) * size_t(k) * sizeof(uint64_t); }

void top_k(const float* x, int n, int k, const int32_t* skip, int n_skip, int32_t* ids, float* logits, float* skipped,
           void* scratch, cudaStream_t s) {
  if (n < 1 || k < 1 || k > kTopKMax || n_skip < 0) throw std::invalid_argument("cuda top_k: bad row size, k or skip count");
  uint64_t* best = static_cast<uint64_t*>(scratch);
  launch("top_k chunks", k_top_k_chunks, chunks(n), kChunkThreads, 0, s, x, n, skip, n_skip, k, best);
  launch("top_k merge", k_top_k_merge, 1, kMergeThreads, 0, s, static_cast<const uint64_t*>(best), chunks(n) * k, k, x,
         skip, n_skip, ids, logits, skipped);
}

}  // namespace upg::cuda
