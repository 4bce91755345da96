"""ple_fast's Triton kernels, one op per file: the kernel, its launch wrapper, its autograd function
(and, where a compiled region calls it, its torch.library op), its public function, and a plain
reference beside it. Shared helpers live in `_common`."""
