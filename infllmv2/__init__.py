"""InfLLM-V2: trainable dense-sparse switchable attention (PyTorch + Triton).

Data flows one way: ``SparseConfig`` -> ``select_blocks`` (stage 1) -> ``sparse_attention`` (stage 2)
-> ``infllmv2_attention`` (the switch) -> ``enable(model)`` (transformers integration).
"""
from .attention import infllmv2_attention, select_blocks, sparse_attention
from .config import SparseConfig

__version__ = "0.1.0"
__all__ = ["SparseConfig", "infllmv2_attention", "select_blocks", "sparse_attention", "enable"]


def __getattr__(name):  # keep `import infllmv2` light; transformers loads on first use
    if name == "enable":
        from .models.transformers import enable
        return enable
    raise AttributeError(f"module 'infllmv2' has no attribute {name!r}")


def _register_with_transformers() -> None:
    """`import infllmv2` registers the attention implementation "infllmv2" when transformers is installed."""
    try:
        from .models.transformers import register
    except ImportError:  # transformers not installed: the core API works without it
        return
    register()


_register_with_transformers()
