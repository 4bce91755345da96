// Dual prefix-tree layout: what one pair (query, original, principled) becomes in a packed batch.
//
// Per pair k (Lq = query length >= 1, R = Lq - 1, Lo / Lp = response lengths >= 0) the packed rows are
//   segment 3k   (root)     : q[0 .. R-1]          positions 0 .. R-1           R rows (may be 0)
//   segment 3k+1 (branch A) : q[R], o[0 .. Lo-1]   positions R .. R+Lo          1 + Lo rows
//   segment 3k+2 (branch B) : q[R], p[0 .. Lp-1]   positions R .. R+Lp          1 + Lp rows
// and the keys (kv_index) of each segment are its ancestors' rows (the root) followed by its own rows.
// The per-row / per-key / per-segment functions below are shared by the CPU loop and the CUDA kernel,
// so both devices run literally the same layout logic; the Python reference in ple_fast/layout.py is
// written independently and is the test oracle.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "check.h"

#if defined(__CUDACC__)
#define PLE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PLE_HOST_DEVICE inline
#endif

namespace ple_fast {

constexpr int64_t kIgnoreLabel = -100;
constexpr int64_t kSegmentsPerPair = 3;

// Rows and keys a pair occupies; summed (prefix sums) they give every pair's offsets.
PLE_HOST_DEVICE int64_t pair_rows(int64_t q_len, int64_t o_len, int64_t p_len) {
  return (q_len - 1) + (1 + o_len) + (1 + p_len);
}
PLE_HOST_DEVICE int64_t pair_keys(int64_t q_len, int64_t o_len, int64_t p_len) {
  const int64_t root = q_len - 1;
  return root + (root + 1 + o_len) + (root + 1 + p_len);
}

// Where pair k reads its tokens and writes its rows / keys.
struct PairSpan {
  int64_t pair;
  int64_t q_off, q_len;
  int64_t o_off, o_len;
  int64_t p_off, p_len;
  int64_t row_off;
  int64_t key_off;
};

// Pointers to the per-row outputs ([N] int64 each).
struct RowOutputs {
  int64_t* input_ids;
  int64_t* position_ids;
  int64_t* labels;
  int64_t* seq_index;
  int64_t* segment_ids;
};

// Pointers to the per-segment outputs (int32).
struct SegmentOutputs {
  int32_t* seg_start;     // [S]
  int32_t* seg_len;       // [S]
  int32_t* seg_parent;    // [S]
  int32_t* cu_seqlens_q;  // [S + 1]; entry 0 is written by the caller
  int32_t* cu_seqlens_k;  // [S + 1]; entry 0 is written by the caller
};

// Row t (0 <= t < pair_rows) of a pair.
PLE_HOST_DEVICE void write_pair_row(const PairSpan& s, int64_t t, const int64_t* query_ids,
                                    const int64_t* orig_ids, const int64_t* prin_ids,
                                    const RowOutputs& out) {
  const int64_t root = s.q_len - 1;
  const int64_t row = s.row_off + t;
  const int64_t* q = query_ids + s.q_off;
  if (t < root) {  // root: predicts the next query token, not scored
    out.input_ids[row] = q[t];
    out.position_ids[row] = t;
    out.labels[row] = q[t + 1];
    out.seq_index[row] = -1;
    out.segment_ids[row] = kSegmentsPerPair * s.pair;
    return;
  }
  // Branch A (original, sequence 2k) or branch B (principled, sequence 2k+1).
  const bool is_a = t < root + 1 + s.o_len;
  const int64_t j = is_a ? t - root : t - root - 1 - s.o_len;  // 0 = the query's last token
  const int64_t* response = is_a ? orig_ids + s.o_off : prin_ids + s.p_off;
  const int64_t response_len = is_a ? s.o_len : s.p_len;
  const bool scored = j < response_len;
  out.input_ids[row] = j == 0 ? q[root] : response[j - 1];
  out.position_ids[row] = root + j;
  out.labels[row] = scored ? response[j] : kIgnoreLabel;
  out.seq_index[row] = scored ? 2 * s.pair + (is_a ? 0 : 1) : -1;
  out.segment_ids[row] = kSegmentsPerPair * s.pair + (is_a ? 1 : 2);
}

// Key t (0 <= t < pair_keys) of a pair: the packed row it gathers.
PLE_HOST_DEVICE void write_pair_key(const PairSpan& s, int64_t t, int64_t* kv_index) {
  const int64_t root = s.q_len - 1;
  const int64_t a_len = 1 + s.o_len;
  int64_t row;
  if (t < root) {  // root segment: its own rows
    row = t;
  } else if (t < root + root + a_len) {  // branch A: root rows then A rows, contiguous
    row = t - root;
  } else {  // branch B: root rows then B rows (skipping A)
    const int64_t u = t - root - root - a_len;
    row = u < root ? u : u + a_len;
  }
  kv_index[s.key_off + t] = s.row_off + row;
}

// The pair's three segments.
PLE_HOST_DEVICE void write_pair_segments(const PairSpan& s, const SegmentOutputs& out) {
  const int64_t root = s.q_len - 1;
  const int64_t seg = kSegmentsPerPair * s.pair;
  const int64_t starts[3] = {s.row_off, s.row_off + root, s.row_off + root + 1 + s.o_len};
  const int64_t lens[3] = {root, 1 + s.o_len, 1 + s.p_len};
  int64_t key_end = s.key_off;
  for (int i = 0; i < 3; ++i) {
    out.seg_start[seg + i] = static_cast<int32_t>(starts[i]);
    out.seg_len[seg + i] = static_cast<int32_t>(lens[i]);
    out.seg_parent[seg + i] = static_cast<int32_t>(i == 0 ? -1 : seg);
    out.cu_seqlens_q[seg + i + 1] = static_cast<int32_t>(starts[i] + lens[i]);
    key_end += (i == 0 ? 0 : root) + lens[i];
    out.cu_seqlens_k[seg + i + 1] = static_cast<int32_t>(key_end);
  }
}

// input_ids, position_ids, labels, seq_index, segment_ids, seg_start, seg_len, seg_parent,
// cu_seqlens_q, cu_seqlens_k, kv_index, max_seqlen_q, max_seqlen_k
using DualLayout = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t,
                              int64_t>;

// The op's output tensors, allocated the same way on either device.
struct DualLayoutTensors {
  at::Tensor input_ids, position_ids, labels, seq_index, segment_ids;            // [rows] int64
  at::Tensor seg_start, seg_len, seg_parent, cu_seqlens_q, cu_seqlens_k;         // int32
  at::Tensor kv_index;                                                           // [keys] int64

  RowOutputs row_outputs() const;
  SegmentOutputs segment_outputs() const;
  DualLayout finish(int64_t max_seqlen_q, int64_t max_seqlen_k) const;
};

// Empty outputs for `rows` tokens, `num_segments` segments and `keys` gathered keys, on the
// device and with the int64 options of `long_opts`.
DualLayoutTensors allocate_dual_layout(int64_t rows, int64_t num_segments, int64_t keys,
                                       const at::TensorOptions& long_opts);

// Every id of a contiguous int64 CPU tensor is >= 0; errors name the op and the tensor (CPU kernels
// of both layout ops).
void check_token_ids(const at::Tensor& ids, const char* op, const char* name);

// Checks that do not read tensor data (dtype, rank, device, matching pair counts); shared by devices.
void check_dual_layout_args(const at::Tensor& query_ids, const at::Tensor& query_lens,
                            const at::Tensor& orig_ids, const at::Tensor& orig_lens,
                            const at::Tensor& prin_ids, const at::Tensor& prin_lens);

}  // namespace ple_fast
