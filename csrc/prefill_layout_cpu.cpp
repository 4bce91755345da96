// CPU kernel of torch.ops.ple_fast.prefill_layout: one pass over the prompts for offsets and
// validation, then the segments in parallel, each writing its rows, keys and segment entry.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "prefill_layout.h"

namespace ple_fast {

namespace {

DualLayout prefill_layout_cpu(const at::Tensor& prefix_ids_in, const at::Tensor& prompt_ids_in,
                              const at::Tensor& prompt_lens_in, const at::Tensor& prefixed_in) {
  check_prefill_layout_args(prefix_ids_in, prompt_ids_in, prompt_lens_in, prefixed_in);
  const at::Tensor prefix_ids = prefix_ids_in.contiguous();
  const at::Tensor prompt_ids = prompt_ids_in.contiguous();
  const at::Tensor prompt_lens = prompt_lens_in.contiguous();
  const at::Tensor prefixed = prefixed_in.contiguous();
  check_token_ids(prefix_ids, "prefill_layout", "prefix_ids");
  check_token_ids(prompt_ids, "prefill_layout", "prompt_ids");

  const int64_t prefix_len = prefix_ids.numel();
  const int64_t has_prefix = prefix_len > 0 ? 1 : 0;
  const int64_t num_prompts = prompt_lens.size(0);
  const int64_t* lens = prompt_lens.data_ptr<int64_t>();
  const bool* follows = prefixed.data_ptr<bool>();
  const int64_t* prompt = prompt_ids.data_ptr<int64_t>();

  std::vector<PrefillSpan> spans;
  spans.reserve(has_prefix + num_prompts);
  int64_t rows = 0, keys = 0, max_seqlen_q = 0, max_seqlen_k = 0, id_off = 0;
  if (has_prefix) {
    spans.push_back({0, prefix_ids.data_ptr<int64_t>(), prefix_len, 0, 0, 0, 0, -1});
    rows = keys = max_seqlen_q = max_seqlen_k = prefix_len;
  }
  for (int64_t b = 0; b < num_prompts; ++b) {
    const int64_t n = lens[b];
    PLE_CHECK(n >= 1, "prefill_layout: prompt_lens[", b, "] = ", n,
              "; every prompt needs at least one token");
    PLE_CHECK(id_off + n <= prompt_ids.numel(), "prefill_layout: prompt_lens sums past the ",
              prompt_ids.numel(), " tokens of prompt_ids (at prompt ", b, ")");
    const int64_t parent_len = follows[b] ? prefix_len : 0;
    const PrefillSpan span{has_prefix + b, prompt + id_off, n, parent_len, parent_len, rows, keys, b};
    spans.push_back(span);
    id_off += n;
    rows += n;
    keys += prefill_span_keys(span);
    max_seqlen_q = std::max(max_seqlen_q, n);
    max_seqlen_k = std::max(max_seqlen_k, prefill_span_keys(span));
  }
  PLE_CHECK(id_off == prompt_ids.numel(), "prefill_layout: prompt_lens sums to ", id_off, " but prompt_ids has ",
            prompt_ids.numel(), " tokens");
  PLE_CHECK(keys <= std::numeric_limits<int32_t>::max(), "prefill_layout: the batch needs ", keys,
            " attention keys, more than int32 cu_seqlens_k can index; split the batch");

  const int64_t num_segments = static_cast<int64_t>(spans.size());
  const DualLayoutTensors out = allocate_dual_layout(rows, num_segments, keys, prompt_ids.options());
  const RowOutputs row_out = out.row_outputs();
  const SegmentOutputs seg_out = out.segment_outputs();
  seg_out.cu_seqlens_q[0] = 0;
  seg_out.cu_seqlens_k[0] = 0;
  int64_t* kv = out.kv_index.data_ptr<int64_t>();
  at::parallel_for(0, num_segments, /*grain_size=*/8, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const PrefillSpan& span = spans[s];
      for (int64_t t = 0; t < span.len; ++t) write_prefill_row(span, t, row_out);
      for (int64_t t = 0; t < prefill_span_keys(span); ++t) write_prefill_key(span, t, kv);
      write_prefill_segment(span, seg_out);
    }
  });
  return out.finish(max_seqlen_q, max_seqlen_k);
}

}  // namespace

TORCH_LIBRARY_IMPL(ple_fast, CPU, m) { m.impl("prefill_layout", &prefill_layout_cpu); }

}  // namespace ple_fast
