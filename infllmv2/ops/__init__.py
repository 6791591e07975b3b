"""Implementations: ``naive`` (the readable reference), ``torch_chunked`` (memory-bounded PyTorch), ``triton`` (GPU kernels)."""
from . import naive, torch_chunked  # noqa: F401
