// Rollout prefill layout: a shared prefix (the principle) and B prompts in one packed sequence.
//
// With a prefix of L >= 1 tokens (h = 1; h = 0 and no prefix segment when L = 0):
//   segment 0       : prefix[0 .. L-1]        positions 0 .. L-1              rows 0 .. L-1
//   segment h + b   : prompt_b[0 .. n_b-1]    positions f_b*L .. f_b*L+n_b-1  rows L + sum_{c<b} n_c ..
// where f_b says whether prompt b follows the prefix (its parent is segment 0) or stands alone (a root).
// A segment's keys (kv_index) are its parent's rows, if any, then its own rows. Labels are the next
// token along the row's path (-100 at a segment's last row), and seq_index marks the one row whose
// output predicts prompt b's first new token (its last row) with b. Both devices run the per-row,
// per-key and per-segment functions below; ple_fast/layout.py holds an independent Python oracle.
#pragma once

#include <cstdint>

#include "dual_layout.h"

namespace ple_fast {

// One segment of the prefill layout: where its tokens come from and where its rows / keys go.
struct PrefillSpan {
  int64_t segment;
  const int64_t* ids;   // its tokens (len of them)
  int64_t len;
  int64_t first_position;
  int64_t parent_len;   // L when the parent is the prefix segment, else 0
  int64_t row_off;
  int64_t key_off;
  int64_t scored;       // prompt index b, or -1 for the prefix
};

PLE_HOST_DEVICE int64_t prefill_span_keys(const PrefillSpan& s) { return s.parent_len + s.len; }

// Row t (0 <= t < len) of a segment.
PLE_HOST_DEVICE void write_prefill_row(const PrefillSpan& s, int64_t t, const RowOutputs& out) {
  const int64_t row = s.row_off + t;
  const bool last = t + 1 == s.len;
  out.input_ids[row] = s.ids[t];
  out.position_ids[row] = s.first_position + t;
  out.labels[row] = last ? kIgnoreLabel : s.ids[t + 1];
  out.seq_index[row] = last && s.scored >= 0 ? s.scored : -1;
  out.segment_ids[row] = s.segment;
}

// Key t (0 <= t < parent_len + len): the packed row it gathers (the prefix occupies rows 0 .. L-1).
PLE_HOST_DEVICE void write_prefill_key(const PrefillSpan& s, int64_t t, int64_t* kv_index) {
  kv_index[s.key_off + t] = t < s.parent_len ? t : s.row_off + (t - s.parent_len);
}

PLE_HOST_DEVICE void write_prefill_segment(const PrefillSpan& s, const SegmentOutputs& out) {
  const int64_t seg = s.segment;
  out.seg_start[seg] = static_cast<int32_t>(s.row_off);
  out.seg_len[seg] = static_cast<int32_t>(s.len);
  out.seg_parent[seg] = s.parent_len > 0 ? 0 : -1;
  out.cu_seqlens_q[seg + 1] = static_cast<int32_t>(s.row_off + s.len);
  out.cu_seqlens_k[seg + 1] = static_cast<int32_t>(s.key_off + prefill_span_keys(s));
}

// Checks that do not read tensor data; shared by devices.
void check_prefill_layout_args(const at::Tensor& prefix_ids, const at::Tensor& prompt_ids,
                               const at::Tensor& prompt_lens, const at::Tensor& prefixed);

}  // namespace ple_fast
