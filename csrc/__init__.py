"""C++/CUDA sources of the compiled kernels (installed as hf_creative_sparse.csrc so the JIT
build finds them after a non-editable install)."""
