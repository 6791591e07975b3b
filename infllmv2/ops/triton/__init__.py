"""Triton kernels of InfLLM-V2 (GPU; tests run them through the Triton interpreter on the CPU)."""
from .sparse_attention import sparse_attention_triton  # noqa: F401
from .selection import compress_keys_varlen, select_blocks_triton  # noqa: F401
from .decode import infllmv2_decode_triton  # noqa: F401
