// What every backend shares: the UPG tensor type codes and alignments (docs/FORMAT.md is the spec),
// the kernels' tuning constants and the kernel-argument structs. One header for C++ (cpp/upg/quant.h
// builds its DType enum and constants from these), Metal (metal/*.metal) and CUDA (cpp/cuda/), as
// ggml-common.h serves ggml's backends. Plain C: includers provide the fixed-width integer types
// (<metal_stdlib> in Metal, <cstdint> in C++ and CUDA).
#pragma once

// dtype codes of the tensor directory (upg::DType).
#define UPG_DTYPE_F32 0
#define UPG_DTYPE_F16 1
#define UPG_DTYPE_BF16 2
#define UPG_DTYPE_Q8_0 3
#define UPG_DTYPE_Q4 4
#define UPG_DTYPE_Q3 5
#define UPG_DTYPE_I32 6
// Format version 2 (docs/FORMAT.md "Versions"): non-uniform grids and super-block scales.
#define UPG_DTYPE_IQ4_NL 7
#define UPG_DTYPE_IQ4_XS 8
#define UPG_DTYPE_IQ3 9
#define UPG_NUM_DTYPES 10

#define UPG_TENSOR_ALIGN 64     // every tensor and every section inside one (upg::kTensorAlign)
#define UPG_DATA_ALIGN 16384    // the data section: one Apple GPU page (upg::kDataAlign)
#define UPG_Q4_ZERO 8           // q4 element value: d * (q - 8)
#define UPG_Q3_ZERO 4           // q3 element value: d * (q - 4)
// iq4_nl, iq4_xs, iq3: element value = scale * grid[q]. The 4-bit grid is llama.cpp's
// kvalues_iq4nl (so GGUF IQ4_NL and IQ4_XS import without rounding); the 3-bit grid was fitted
// (Lloyd iterations, tools/fit_iq3_grid.py) to the weights of a Phi-3-architecture model divided by
// their 32-element block's scale. Both are asymmetric: a block's scale may take either sign, so a
// block picks the grid or its mirror image.
#define UPG_IQ4_GRID {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113}
#define UPG_IQ3_GRID {-127, -76, -43, -17, 8, 35, 65, 105}
#define UPG_SUPER_BLOCK 256     // iq4_xs, iq3: elements per f16 super-scale (8 sub-blocks of 32)
#define UPG_SUB_SCALE_BIAS 32   // iq4_xs, iq3: sub-block scale = d * (ls - 32), ls a 6-bit code

// Index vocabulary of the kernels (as in ggml-metal): tgpig = threadgroup_position_in_grid,
// tpitg = thread_position_in_threadgroup, ntg = threads_per_threadgroup,
// tiisg = thread_index_in_simdgroup, sgitg = simdgroup_index_in_threadgroup.

// Tuning constants: the host sizes its dispatches from these.
#define UPG_SIMD_WIDTH 32
#define UPG_MV_SG 2             // mat-vec: simdgroups per threadgroup
#define UPG_MV_ROWS 4           // mat-vec: rows owned by one simdgroup
#define UPG_MM_TM 32            // mat-mat: weight rows per threadgroup (8 per simdgroup)
#define UPG_MM_TN 16            // mat-mat: tokens per threadgroup
#define UPG_MM_TK 32            // mat-mat: k step staged in threadgroup memory
#define UPG_MM_SG 4             // mat-mat: simdgroups per threadgroup (UPG_MM_TM / 8)
#define UPG_ATTN_SG 4           // attention: simdgroups per threadgroup
#define UPG_ATTN_MAX_HEAD_DIM 256  // head_dim: a multiple of 32, at most this
#define UPG_REDUCE_THREADS 256  // rms_norm and argmax: threads per threadgroup

// A weight matrix [rows, cols] of any type, as one buffer holding its sections (FORMAT.md), plus
// the optional CSR outliers in their own buffers.
struct UpgMatArgs {
  int32_t rows;
  int32_t cols;
  int32_t block;          // elements per scale block (quantized types), else 0
  uint32_t high_offset;   // q3: byte offset of the qh section, = pad64(codes)
  uint32_t scales_offset; // quantized: byte offset of the f16 scales, = pad64(codes) + pad64(high) + pad64(sub)
  uint32_t sub_offset;    // iq4_xs, iq3: byte offset of the sub-block scales, = pad64(codes) + pad64(high)
  int32_t has_outliers;   // 1 when the rowptr/col/val buffers are bound
  int32_t n_tokens;       // mat-mat and get_rows: tokens (rows of x / entries of ids)
  int32_t ldy;            // mat-mat: stride of y between tokens (>= rows)
};

struct UpgNormArgs {
  int32_t n;      // elements per row
  float eps;
};

// The values that change from one pass to the next, read by the kernels from a small buffer (not
// baked into launch arguments) so that one decode step can be recorded once and replayed. The
// buffer holds this header, then one UpgToken per token of the pass, then n_seqs UpgSeq entries:
// a pass evaluates tokens of one or more sequences, each in its own region (slot) of the KV cache.
// Sequence 0's n_past is repeated in the header (greedy decoding's next_token appends there).
struct UpgPass {
  int32_t n_past;         // position of sequence 0's first token (tokens already in its KV region)
  int32_t n_tokens;       // tokens in this pass
  int32_t n_seqs;         // UpgSeq entries after the tokens' entries
  int32_t n_decode;       // tokens [0, n_decode) are generated tokens, the rest prompt tokens: a backend
                          // may compute the two kinds by different kernels, but each kind always by
                          // the same ones whatever else the pass holds (batch-invariant results)
};

// Token t of a pass: stored at position kv_base + pos of each kv head's run of the cache, attending
// positions kv_base + [0, pos]; RoPE at position pos.
struct UpgToken {
  int32_t pos;            // position in its sequence
  int32_t kv_base;        // its sequence's slot: slot * positions per slot
  int32_t rope_set;       // 1: rotate with the inverse frequencies rot_dims / 2 floats past those the
                          // op was given (LongRoPE's long set; always 0 in a pass of one sequence)
  int32_t seq;            // its sequence (UpgSeq index)
};

// One sequence of a pass: tokens [first, first + n_tokens) of the pass, at positions n_past.. of
// its slot (the same values as its tokens' UpgToken entries, by sequence).
struct UpgSeq {
  int32_t first;
  int32_t n_tokens;
  int32_t n_past;
  int32_t kv_base;
  int32_t rope_set;
  int32_t pad[3];
};

// Rotate-half (NeoX) RoPE over the first rot_dims of each head: pairs (i, i + rot_dims/2).
// angle = (n_past + t) * inv_freq[i] (inv_freq: the model's, LongRoPE factors applied, computed once
// on the host); cos and sin are scaled by attn_factor (LongRoPE).
struct UpgRopeArgs {
  int32_t n_tokens;
  int32_t n_heads;        // heads rotated per token (query heads + key heads)
  int32_t head_dim;
  int32_t rot_dims;       // partial rotary: an even number <= head_dim
  int32_t token_stride;   // floats between consecutive tokens
  float attn_factor;
};

// KV cache of one layer: [n_kv_heads][kv_stride positions][head_dim], f16 or f32. Token t of a pass
// is stored at position kv_base + pos of each kv head's run and attends positions kv_base + [0, pos]
// (its UpgToken).
struct UpgAttnArgs {
  int32_t n_heads;
  int32_t n_kv_heads;     // divides n_heads (GQA)
  int32_t head_dim;
  int32_t kv_stride;      // positions per KV head in the cache (n_ctx)
  int32_t q_stride;       // floats between the queries of consecutive tokens
  int32_t n_tokens;       // query tokens
  float scale;            // softmax scale, 1/sqrt(head_dim)
  // The pass's shape, as UpgPass holds it, for backends that size their launches on the host (CUDA):
  int32_t n_decode;       // tokens [0, n_decode) are generated tokens
  int32_t n_seqs;         // sequences in the pass
  int32_t slot_len;       // positions of one sequence's slot (n_ctx): the most a token attends
};

struct UpgEltArgs {
  int32_t n;              // elements (add) or elements per token (silu_mul)
  int32_t n_tokens;
  int32_t in_stride;      // silu_mul: floats between tokens of gate_up (>= 2n)
};
