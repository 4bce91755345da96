// CUDA kernel of torch.ops.ple_fast.dual_layout, for token ids that already live on the GPU.
//
// Offsets come from prefix sums over the lengths on the device; the output sizes and the validation
// results come back in ONE small device->host copy (output sizes depend on the data, so one sync is
// unavoidable); then one thread block per pair writes its rows, keys and segments with the same
// per-element functions as the CPU kernel (dual_layout.h). No host loop over pairs or tokens.
#include <cstdint>
#include <limits>

// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// minimal CUDA toolkit lacks).
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dual_layout.h"

namespace ple_fast {

namespace {

constexpr int kThreadsPerPair = 256;

__global__ void dual_layout_kernel(const int64_t* q_lens, const int64_t* o_lens,
                                   const int64_t* p_lens, const int64_t* q_end,
                                   const int64_t* o_end, const int64_t* p_end,
                                   const int64_t* row_end, const int64_t* key_end,
                                   const int64_t* query_ids, const int64_t* orig_ids,
                                   const int64_t* prin_ids, RowOutputs row_out,
                                   SegmentOutputs seg_out, int64_t* kv_index) {
  const int64_t k = blockIdx.x;
  PairSpan s;
  s.pair = k;
  s.q_len = q_lens[k];
  s.o_len = o_lens[k];
  s.p_len = p_lens[k];
  s.q_off = q_end[k] - s.q_len;
  s.o_off = o_end[k] - s.o_len;
  s.p_off = p_end[k] - s.p_len;
  const int64_t n_rows = pair_rows(s.q_len, s.o_len, s.p_len);
  const int64_t n_keys = pair_keys(s.q_len, s.o_len, s.p_len);
  s.row_off = row_end[k] - n_rows;
  s.key_off = key_end[k] - n_keys;
  for (int64_t t = threadIdx.x; t < n_rows; t += blockDim.x) {
    write_pair_row(s, t, query_ids, orig_ids, prin_ids, row_out);
  }
  for (int64_t t = threadIdx.x; t < n_keys; t += blockDim.x) {
    write_pair_key(s, t, kv_index);
  }
  if (threadIdx.x == 0) {
    write_pair_segments(s, seg_out);
    if (k == 0) {
      seg_out.cu_seqlens_q[0] = 0;
      seg_out.cu_seqlens_k[0] = 0;
    }
  }
}

// Host-side facts gathered in one copy, in this order.
enum Stat : int64_t {
  kMinQueryLen,
  kMinOrigLen,
  kMinPrinLen,
  kQueryTotal,
  kOrigTotal,
  kPrinTotal,
  kRows,
  kKeys,
  kMaxSeqlenQ,
  kMaxSeqlenK,
  kNegativeIds,
  kNumStats
};

DualLayout dual_layout_cuda(const at::Tensor& query_ids_in, const at::Tensor& query_lens_in,
                            const at::Tensor& orig_ids_in, const at::Tensor& orig_lens_in,
                            const at::Tensor& prin_ids_in, const at::Tensor& prin_lens_in) {
  check_dual_layout_args(query_ids_in, query_lens_in, orig_ids_in, orig_lens_in, prin_ids_in,
                         prin_lens_in);
  const c10::cuda::CUDAGuard device_guard(query_ids_in.device());
  const at::Tensor query_ids = query_ids_in.contiguous();
  const at::Tensor orig_ids = orig_ids_in.contiguous();
  const at::Tensor prin_ids = prin_ids_in.contiguous();
  const at::Tensor query_lens = query_lens_in.contiguous();
  const at::Tensor orig_lens = orig_lens_in.contiguous();
  const at::Tensor prin_lens = prin_lens_in.contiguous();
  const int64_t num_pairs = query_lens.size(0);
  const auto long_opts = query_ids.options();
  const int64_t num_segments = kSegmentsPerPair * num_pairs;

  int64_t rows = 0, keys = 0, max_seqlen_q = 0, max_seqlen_k = 0;
  at::Tensor q_end, o_end, p_end, row_end, key_end;
  if (num_pairs == 0) {
    PLE_CHECK(query_ids.numel() == 0 && orig_ids.numel() == 0 && prin_ids.numel() == 0,
              "dual_layout: no pairs (empty length tensors) but the id tensors are not empty");
  } else {
    q_end = query_lens.cumsum(0);
    o_end = orig_lens.cumsum(0);
    p_end = prin_lens.cumsum(0);
    row_end = query_lens.add(orig_lens).add(prin_lens).add(1).cumsum(0);
    key_end = query_lens.mul(3).add(orig_lens).add(prin_lens).sub(1).cumsum(0);
    const at::Tensor negative_ids =
        query_ids.lt(0).sum().add(orig_ids.lt(0).sum()).add(prin_ids.lt(0).sum());
    const at::Tensor seqlen_q =
        at::stack({query_lens.sub(1).max(), orig_lens.add(1).max(), prin_lens.add(1).max()}).max();
    const at::Tensor seqlen_k = query_lens.add(orig_lens.maximum(prin_lens)).max();
    const at::Tensor stats_dev = at::stack({
        query_lens.min(), orig_lens.min(), prin_lens.min(), q_end.select(0, num_pairs - 1),
        o_end.select(0, num_pairs - 1), p_end.select(0, num_pairs - 1),
        row_end.select(0, num_pairs - 1), key_end.select(0, num_pairs - 1), seqlen_q, seqlen_k,
        negative_ids});
    const at::Tensor stats_host = stats_dev.cpu();
    const int64_t* st = stats_host.data_ptr<int64_t>();
    PLE_CHECK(st[kMinQueryLen] >= 1, "dual_layout: query_lens has an entry of ",
              st[kMinQueryLen],
              "; every query needs at least one token (its last token starts both responses)");
    PLE_CHECK(st[kMinOrigLen] >= 0, "dual_layout: orig_lens has a negative entry (",
              st[kMinOrigLen], ")");
    PLE_CHECK(st[kMinPrinLen] >= 0, "dual_layout: prin_lens has a negative entry (",
              st[kMinPrinLen], ")");
    PLE_CHECK(st[kQueryTotal] == query_ids.numel(), "dual_layout: query_lens sums to ",
              st[kQueryTotal], " but query_ids has ", query_ids.numel(), " tokens");
    PLE_CHECK(st[kOrigTotal] == orig_ids.numel(), "dual_layout: orig_lens sums to ",
              st[kOrigTotal], " but orig_ids has ", orig_ids.numel(), " tokens");
    PLE_CHECK(st[kPrinTotal] == prin_ids.numel(), "dual_layout: prin_lens sums to ",
              st[kPrinTotal], " but prin_ids has ", prin_ids.numel(), " tokens");
    PLE_CHECK(st[kNegativeIds] == 0, "dual_layout: ", st[kNegativeIds],
              " token ids are negative; token ids must be >= 0 (", kIgnoreLabel,
              " marks rows without a label)");
    PLE_CHECK(st[kKeys] <= std::numeric_limits<int32_t>::max(), "dual_layout: the batch needs ",
              st[kKeys], " attention keys, more than int32 cu_seqlens_k can index; split the batch");
    PLE_CHECK(num_pairs <= std::numeric_limits<int32_t>::max(), "dual_layout: too many pairs (",
              num_pairs, ") for one grid");
    rows = st[kRows];
    keys = st[kKeys];
    max_seqlen_q = st[kMaxSeqlenQ];
    max_seqlen_k = st[kMaxSeqlenK];
  }

  const DualLayoutTensors out = allocate_dual_layout(rows, num_segments, keys, long_opts);
  if (num_pairs == 0) {
    out.cu_seqlens_q.zero_();
    out.cu_seqlens_k.zero_();
  } else {
    const RowOutputs row_out = out.row_outputs();
    const SegmentOutputs seg_out = out.segment_outputs();
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dual_layout_kernel<<<static_cast<unsigned int>(num_pairs), kThreadsPerPair, 0, stream>>>(
        query_lens.data_ptr<int64_t>(), orig_lens.data_ptr<int64_t>(),
        prin_lens.data_ptr<int64_t>(), q_end.data_ptr<int64_t>(), o_end.data_ptr<int64_t>(),
        p_end.data_ptr<int64_t>(), row_end.data_ptr<int64_t>(), key_end.data_ptr<int64_t>(),
        query_ids.data_ptr<int64_t>(), orig_ids.data_ptr<int64_t>(),
        prin_ids.data_ptr<int64_t>(), row_out, seg_out, out.kv_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.finish(max_seqlen_q, max_seqlen_k);
}

}  // namespace

TORCH_LIBRARY_IMPL(ple_fast, CUDA, m) { m.impl("dual_layout", &dual_layout_cuda); }

}  // namespace ple_fast
