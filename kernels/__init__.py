"""Triton kernels (installed as densefuse.kernels). Imported lazily: triton is optional."""
