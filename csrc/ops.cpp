// Schema of the ple_fast ops and the Python module ple_fast._C whose import registers them.
//
// Importing ple_fast._C (after torch) runs the static TORCH_LIBRARY registrations of this shared
// library; the ops are then torch.ops.ple_fast.<name>. The module itself exposes only build facts.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "dual_layout.h"
#include "prefill_layout.h"

namespace ple_fast {

namespace {

void check_one(const at::Tensor& t, const char* name, const char* op = "dual_layout",
               at::ScalarType dtype = at::kLong) {
  PLE_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  PLE_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype == at::kLong ? "int64" : "bool",
            ", got ", t.scalar_type());
}

}  // namespace

DualLayoutTensors allocate_dual_layout(int64_t rows, int64_t num_segments, int64_t keys,
                                       const at::TensorOptions& long_opts) {
  const auto int_opts = long_opts.dtype(at::kInt);
  return {at::empty({rows}, long_opts),          at::empty({rows}, long_opts),
          at::empty({rows}, long_opts),          at::empty({rows}, long_opts),
          at::empty({rows}, long_opts),          at::empty({num_segments}, int_opts),
          at::empty({num_segments}, int_opts),   at::empty({num_segments}, int_opts),
          at::empty({num_segments + 1}, int_opts), at::empty({num_segments + 1}, int_opts),
          at::empty({keys}, long_opts)};
}

RowOutputs DualLayoutTensors::row_outputs() const {
  return {input_ids.data_ptr<int64_t>(), position_ids.data_ptr<int64_t>(), labels.data_ptr<int64_t>(),
          seq_index.data_ptr<int64_t>(), segment_ids.data_ptr<int64_t>()};
}

SegmentOutputs DualLayoutTensors::segment_outputs() const {
  return {seg_start.data_ptr<int32_t>(), seg_len.data_ptr<int32_t>(), seg_parent.data_ptr<int32_t>(),
          cu_seqlens_q.data_ptr<int32_t>(), cu_seqlens_k.data_ptr<int32_t>()};
}

DualLayout DualLayoutTensors::finish(int64_t max_seqlen_q, int64_t max_seqlen_k) const {
  return {input_ids,  position_ids, labels,       seq_index,    segment_ids,
          seg_start,  seg_len,      seg_parent,   cu_seqlens_q, cu_seqlens_k,
          kv_index,   max_seqlen_q, max_seqlen_k};
}

void check_dual_layout_args(const at::Tensor& query_ids, const at::Tensor& query_lens,
                            const at::Tensor& orig_ids, const at::Tensor& orig_lens,
                            const at::Tensor& prin_ids, const at::Tensor& prin_lens) {
  check_one(query_ids, "query_ids");
  check_one(query_lens, "query_lens");
  check_one(orig_ids, "orig_ids");
  check_one(orig_lens, "orig_lens");
  check_one(prin_ids, "prin_ids");
  check_one(prin_lens, "prin_lens");
  const auto device = query_ids.device();
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&query_lens, "query_lens"}, {&orig_ids, "orig_ids"},   {&orig_lens, "orig_lens"},
      {&prin_ids, "prin_ids"},     {&prin_lens, "prin_lens"}};
  for (const auto& [t, name] : others) {
    PLE_CHECK(t->device() == device, "dual_layout: ", name, " is on ", t->device(),
              " but query_ids is on ", device, "; all six inputs must be on one device");
  }
  PLE_CHECK(orig_lens.size(0) == query_lens.size(0),
            "dual_layout: orig_lens has ", orig_lens.size(0), " entries but query_lens has ",
            query_lens.size(0), " (one per pair)");
  PLE_CHECK(prin_lens.size(0) == query_lens.size(0),
            "dual_layout: prin_lens has ", prin_lens.size(0), " entries but query_lens has ",
            query_lens.size(0), " (one per pair)");
}

void check_prefill_layout_args(const at::Tensor& prefix_ids, const at::Tensor& prompt_ids,
                               const at::Tensor& prompt_lens, const at::Tensor& prefixed) {
  constexpr const char* op = "prefill_layout";
  check_one(prefix_ids, "prefix_ids", op);
  check_one(prompt_ids, "prompt_ids", op);
  check_one(prompt_lens, "prompt_lens", op);
  check_one(prefixed, "prefixed", op, at::kBool);
  const auto device = prompt_ids.device();
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&prefix_ids, "prefix_ids"}, {&prompt_lens, "prompt_lens"}, {&prefixed, "prefixed"}};
  for (const auto& [t, name] : others) {
    PLE_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(),
              " but prompt_ids is on ", device, "; all four inputs must be on one device");
  }
  PLE_CHECK(prefixed.size(0) == prompt_lens.size(0), op, ": prefixed has ", prefixed.size(0),
            " entries but prompt_lens has ", prompt_lens.size(0), " (one per prompt)");
}

TORCH_LIBRARY(ple_fast, m) {
  m.def(
      "dual_layout(Tensor query_ids, Tensor query_lens, Tensor orig_ids, Tensor orig_lens, "
      "Tensor prin_ids, Tensor prin_lens) -> (Tensor input_ids, Tensor position_ids, "
      "Tensor labels, Tensor seq_index, Tensor segment_ids, Tensor seg_start, Tensor seg_len, "
      "Tensor seg_parent, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor kv_index, "
      "int max_seqlen_q, int max_seqlen_k)");
  m.def(
      "prefill_layout(Tensor prefix_ids, Tensor prompt_ids, Tensor prompt_lens, Tensor prefixed) -> "
      "(Tensor input_ids, Tensor position_ids, Tensor labels, Tensor seq_index, Tensor segment_ids, "
      "Tensor seg_start, Tensor seg_len, Tensor seg_parent, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor kv_index, int max_seqlen_q, int max_seqlen_k)");
}

}  // namespace ple_fast

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "ple_fast C++/CUDA ops; importing registers torch.ops.ple_fast.*",
      -1,       // m_size: no per-module state
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef PLE_FAST_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
