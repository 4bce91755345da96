// CPU kernel of torch.ops.ple_fast.dual_layout: one pass over the pairs for offsets and validation,
// then the pairs in parallel, each writing its rows, keys and segments (dual_layout.h).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dual_layout.h"

namespace ple_fast {

void check_token_ids(const at::Tensor& ids, const char* op, const char* name) {
  const int64_t* data = ids.data_ptr<int64_t>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i) {
    PLE_CHECK(data[i] >= 0, op, ": ", name, "[", i, "] = ", data[i],
              "; token ids must be >= 0 (", kIgnoreLabel, " marks rows without a label)");
  }
}

namespace {

void check_length(int64_t len, int64_t min_len, int64_t flat_size, const char* name, int64_t pair,
                  const char* ids_name) {
  PLE_CHECK(len >= min_len, "dual_layout: ", name, "[", pair, "] = ", len,
            min_len == 1 ? "; every query needs at least one token (its last token starts both "
                           "responses)"
                         : "; lengths must be >= 0");
  PLE_CHECK(len <= flat_size, "dual_layout: ", name, "[", pair, "] = ", len, " exceeds the ",
            flat_size, " tokens of ", ids_name);
}

void check_total(int64_t total, const at::Tensor& ids, const char* lens_name, const char* ids_name) {
  PLE_CHECK(total == ids.numel(), "dual_layout: ", lens_name, " sums to ", total, " but ",
            ids_name, " has ", ids.numel(), " tokens");
}

DualLayout dual_layout_cpu(const at::Tensor& query_ids_in, const at::Tensor& query_lens_in,
                           const at::Tensor& orig_ids_in, const at::Tensor& orig_lens_in,
                           const at::Tensor& prin_ids_in, const at::Tensor& prin_lens_in) {
  check_dual_layout_args(query_ids_in, query_lens_in, orig_ids_in, orig_lens_in, prin_ids_in,
                         prin_lens_in);
  const at::Tensor query_ids = query_ids_in.contiguous();
  const at::Tensor orig_ids = orig_ids_in.contiguous();
  const at::Tensor prin_ids = prin_ids_in.contiguous();
  const at::Tensor query_lens = query_lens_in.contiguous();
  const at::Tensor orig_lens = orig_lens_in.contiguous();
  const at::Tensor prin_lens = prin_lens_in.contiguous();
  check_token_ids(query_ids, "dual_layout", "query_ids");
  check_token_ids(orig_ids, "dual_layout", "orig_ids");
  check_token_ids(prin_ids, "dual_layout", "prin_ids");

  const int64_t num_pairs = query_lens.size(0);
  const int64_t* q_lens = query_lens.data_ptr<int64_t>();
  const int64_t* o_lens = orig_lens.data_ptr<int64_t>();
  const int64_t* p_lens = prin_lens.data_ptr<int64_t>();

  std::vector<PairSpan> spans(num_pairs);
  int64_t q_total = 0, o_total = 0, p_total = 0, rows = 0, keys = 0;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
  for (int64_t k = 0; k < num_pairs; ++k) {
    const int64_t lq = q_lens[k], lo = o_lens[k], lp = p_lens[k];
    check_length(lq, 1, query_ids.numel(), "query_lens", k, "query_ids");
    check_length(lo, 0, orig_ids.numel(), "orig_lens", k, "orig_ids");
    check_length(lp, 0, prin_ids.numel(), "prin_lens", k, "prin_ids");
    spans[k] = PairSpan{k, q_total, lq, o_total, lo, p_total, lp, rows, keys};
    q_total += lq;
    o_total += lo;
    p_total += lp;
    rows += pair_rows(lq, lo, lp);
    keys += pair_keys(lq, lo, lp);
    max_seqlen_q = std::max({max_seqlen_q, lq - 1, 1 + lo, 1 + lp});
    max_seqlen_k = std::max(max_seqlen_k, lq + std::max(lo, lp));
  }
  check_total(q_total, query_ids, "query_lens", "query_ids");
  check_total(o_total, orig_ids, "orig_lens", "orig_ids");
  check_total(p_total, prin_ids, "prin_lens", "prin_ids");
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  PLE_CHECK(keys <= kInt32Max, "dual_layout: the batch needs ", keys,
            " attention keys, more than int32 cu_seqlens_k can index; split the batch");

  const int64_t num_segments = kSegmentsPerPair * num_pairs;
  const DualLayoutTensors out = allocate_dual_layout(rows, num_segments, keys, query_ids.options());
  const RowOutputs row_out = out.row_outputs();
  const SegmentOutputs seg_out = out.segment_outputs();
  seg_out.cu_seqlens_q[0] = 0;
  seg_out.cu_seqlens_k[0] = 0;
  const int64_t* q = query_ids.data_ptr<int64_t>();
  const int64_t* o = orig_ids.data_ptr<int64_t>();
  const int64_t* p = prin_ids.data_ptr<int64_t>();
  int64_t* kv = out.kv_index.data_ptr<int64_t>();
  at::parallel_for(0, num_pairs, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const PairSpan& s = spans[k];
      const int64_t n_rows = pair_rows(s.q_len, s.o_len, s.p_len);
      for (int64_t t = 0; t < n_rows; ++t) write_pair_row(s, t, q, o, p, row_out);
      const int64_t n_keys = pair_keys(s.q_len, s.o_len, s.p_len);
      for (int64_t t = 0; t < n_keys; ++t) write_pair_key(s, t, kv);
      write_pair_segments(s, seg_out);
    }
  });
  return out.finish(max_seqlen_q, max_seqlen_k);
}

}  // namespace

TORCH_LIBRARY_IMPL(ple_fast, CPU, m) { m.impl("dual_layout", &dual_layout_cpu); }

}  // namespace ple_fast
