"""Triton kernels of prism_mcore (installed as `prism_kernels`)."""
