"""Triton kernels of the kvpo ops (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)."""
