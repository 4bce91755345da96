// CUDA kernel of torch.ops.ple_fast.prefill_layout, for prompts that already live on the GPU.
//
// Offsets are prefix sums over the lengths on the device; output sizes and validation facts come
// back in ONE small device->host copy (the sizes depend on the data), then one thread block per
// segment writes its rows, keys and segment entry with the functions the CPU kernel uses.
#include <cstdint>
#include <limits>

#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "prefill_layout.h"

namespace ple_fast {

namespace {

constexpr int kThreadsPerSegment = 256;

__global__ void prefill_layout_kernel(const int64_t* prefix_ids, int64_t prefix_len, const int64_t* prompt_ids,
                                      const int64_t* lens, const int64_t* parent_lens, const int64_t* id_end,
                                      const int64_t* row_end, const int64_t* key_end, RowOutputs row_out,
                                      SegmentOutputs seg_out, int64_t* kv_index) {
  const int64_t has_prefix = prefix_len > 0 ? 1 : 0;
  const int64_t s = blockIdx.x;
  PrefillSpan span;
  if (s < has_prefix) {
    span = {0, prefix_ids, prefix_len, 0, 0, 0, 0, -1};
  } else {
    const int64_t b = s - has_prefix;
    const int64_t n = lens[b];
    span = {s, prompt_ids + id_end[b] - n, n, parent_lens[b], parent_lens[b], row_end[b] - n,
            key_end[b] - n - parent_lens[b], b};
  }
  for (int64_t t = threadIdx.x; t < span.len; t += blockDim.x) write_prefill_row(span, t, row_out);
  for (int64_t t = threadIdx.x; t < prefill_span_keys(span); t += blockDim.x) write_prefill_key(span, t, kv_index);
  if (threadIdx.x == 0) {
    write_prefill_segment(span, seg_out);
    if (s == 0) {
      seg_out.cu_seqlens_q[0] = 0;
      seg_out.cu_seqlens_k[0] = 0;
    }
  }
}

enum Stat : int64_t { kMinLen, kIdTotal, kRows, kKeys, kMaxSeqlenQ, kMaxSeqlenK, kNegativeIds, kNumStats };

DualLayout prefill_layout_cuda(const at::Tensor& prefix_ids_in, const at::Tensor& prompt_ids_in,
                               const at::Tensor& prompt_lens_in, const at::Tensor& prefixed_in) {
  check_prefill_layout_args(prefix_ids_in, prompt_ids_in, prompt_lens_in, prefixed_in);
  const c10::cuda::CUDAGuard device_guard(prompt_ids_in.device());
  const at::Tensor prefix_ids = prefix_ids_in.contiguous();
  const at::Tensor prompt_ids = prompt_ids_in.contiguous();
  const at::Tensor lens = prompt_lens_in.contiguous();
  const int64_t prefix_len = prefix_ids.numel();
  const int64_t has_prefix = prefix_len > 0 ? 1 : 0;
  const int64_t num_prompts = lens.size(0);
  const int64_t num_segments = has_prefix + num_prompts;

  at::Tensor parent_lens, id_end, row_end, key_end;
  int64_t rows = prefix_len, keys = prefix_len, max_seqlen_q = prefix_len, max_seqlen_k = prefix_len;
  const at::Tensor prefix_negative = prefix_ids.lt(0).sum();
  if (num_prompts == 0) {
    PLE_CHECK(prompt_ids.numel() == 0, "prefill_layout: no prompts (empty prompt_lens) but prompt_ids holds ",
              prompt_ids.numel(), " tokens");
    PLE_CHECK(prefix_negative.item<int64_t>() == 0, "prefill_layout: prefix_ids holds negative token ids");
  } else {
    parent_lens = prefixed_in.contiguous().to(at::kLong).mul(prefix_len);
    id_end = lens.cumsum(0);
    row_end = id_end.add(prefix_len);
    key_end = lens.add(parent_lens).cumsum(0).add(prefix_len);
    const at::Tensor stats_dev = at::stack({
        lens.min(), id_end.select(0, num_prompts - 1), row_end.select(0, num_prompts - 1),
        key_end.select(0, num_prompts - 1), lens.max(), lens.add(parent_lens).max(),
        prompt_ids.lt(0).sum().add(prefix_negative)});
    const at::Tensor stats_host = stats_dev.cpu();
    const int64_t* st = stats_host.data_ptr<int64_t>();
    PLE_CHECK(st[kMinLen] >= 1, "prefill_layout: prompt_lens has an entry of ", st[kMinLen],
              "; every prompt needs at least one token");
    PLE_CHECK(st[kIdTotal] == prompt_ids.numel(), "prefill_layout: prompt_lens sums to ", st[kIdTotal],
              " but prompt_ids has ", prompt_ids.numel(), " tokens");
    PLE_CHECK(st[kNegativeIds] == 0, "prefill_layout: ", st[kNegativeIds],
              " token ids are negative; token ids must be >= 0");
    PLE_CHECK(st[kKeys] <= std::numeric_limits<int32_t>::max(), "prefill_layout: the batch needs ", st[kKeys],
              " attention keys, more than int32 cu_seqlens_k can index; split the batch");
    PLE_CHECK(num_segments <= std::numeric_limits<int32_t>::max(), "prefill_layout: too many prompts (",
              num_prompts, ") for one grid");
    rows = st[kRows];
    keys = st[kKeys];
    max_seqlen_q = std::max(max_seqlen_q, st[kMaxSeqlenQ]);
    max_seqlen_k = std::max(max_seqlen_k, st[kMaxSeqlenK]);
  }

  const DualLayoutTensors out = allocate_dual_layout(rows, num_segments, keys, prompt_ids.options());
  if (num_segments == 0) {
    out.cu_seqlens_q.zero_();
    out.cu_seqlens_k.zero_();
    return out.finish(0, 0);
  }
  // With no prompts the length tensors are empty; the kernel then only reads the prefix.
  const at::Tensor none = at::zeros({1}, lens.options());
  auto ptr = [&](const at::Tensor& t) { return (t.defined() ? t : none).data_ptr<int64_t>(); };
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  prefill_layout_kernel<<<static_cast<unsigned int>(num_segments), kThreadsPerSegment, 0, stream>>>(
      prefix_ids.data_ptr<int64_t>(), prefix_len, prompt_ids.data_ptr<int64_t>(), ptr(lens), ptr(parent_lens),
      ptr(id_end), ptr(row_end), ptr(key_end), out.row_outputs(), out.segment_outputs(),
      out.kv_index.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.finish(max_seqlen_q, max_seqlen_k);
}

}  // namespace

TORCH_LIBRARY_IMPL(ple_fast, CUDA, m) { m.impl("prefill_layout", &prefill_layout_cuda); }

}  // namespace ple_fast
