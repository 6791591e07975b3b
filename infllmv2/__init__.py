"""InfLLM-V2: trainable dense-sparse switchable attention (PyTorch + Triton).

Data flows one way: ``SparseConfig`` -> ``select_blocks`` (stage 1) -> ``sparse_attention`` (stage 2)
-> ``infllmv2_attention`` (the switch) -> ``enable(model)`` (transformers integration).
"""
from .attention import infllmv2_attention, infllmv2_with_kvcache, select_blocks, sparse_attention
from .config import SparseConfig

__version__ = "0.1.0"
__all__ = ["SparseConfig", "infllmv2_attention", "infllmv2_with_kvcache", "select_blocks", "sparse_attention",
           "enable", "disable",
           "InfLLMv2Cache", "InfLLMv2StaticCache"]


def __getattr__(name):  # transformers-dependent names load on first use
    if name in ("enable", "disable"):
        from .models import transformers as _tf
        return getattr(_tf, name)
    if name in ("InfLLMv2Cache", "InfLLMv2StaticCache"):
        from . import cache as _cache
        return getattr(_cache, name)
    raise AttributeError(f"module 'infllmv2' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """`import infllmv2` registers the attention implementation "infllmv2" when transformers is installed."""
    try:
        from .models.transformers import register
    except ImportError:  # transformers not installed: the core API works without it
        return
    register()


_register_with_transformers()
