"""Configuration of InfLLM-V2 sparse attention (defaults = MiniCPM4 / MiniCPM4.1 ``sparse_config``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["SparseConfig", "as_sparse_config"]


@dataclass(frozen=True)
class SparseConfig:
    """Hyper-parameters of InfLLM-V2 (see SPEC.md, "Configuration").

    block_size:    granularity B of selection and of the sparse attention.
    kernel_size:   window lc of the fine compressed keys.
    kernel_stride: stride sc of the fine compressed keys.
    init_blocks:   leading blocks every token always sees (attention sink).
    window_size:   local window w in tokens; ``local_blocks = w // B``.
    topk:          with ``local_blocks`` sets the budget ``topk + local_blocks`` blocks per token.
    dense_len:     sequences whose key length is below it run dense; -1 = always sparse.
    lse_approx:    normalise stage-1 scores with coarse keys (kernel 4*lc, stride 4*sc).
    use_nope:      score with pre-RoPE q/k (needs the caller to pass them).
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    lse_approx: bool = True
    use_nope: bool = False

    def __post_init__(self) -> None:
        for name in ("block_size", "kernel_size", "kernel_stride", "init_blocks", "window_size", "topk", "dense_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SparseConfig.{name} must be an int, got {type(value).__name__}")
        for name in ("lse_approx", "use_nope"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SparseConfig.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        for name in ("block_size", "kernel_size", "kernel_stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SparseConfig.{name} must be positive, got {getattr(self, name)}")
        if self.init_blocks < 0:
            raise ValueError(f"SparseConfig.init_blocks must be >= 0, got {self.init_blocks}")
        if self.window_size < 0:
            raise ValueError(f"SparseConfig.window_size must be >= 0, got {self.window_size}")
        if self.kernel_size % self.kernel_stride:
            raise ValueError(
                f"SparseConfig.kernel_size ({self.kernel_size}) must be a multiple of kernel_stride ({self.kernel_stride})")
        if self.block_size % self.kernel_stride:
            raise ValueError(
                f"SparseConfig.block_size ({self.block_size}) must be a multiple of kernel_stride ({self.kernel_stride})")
        if self.window_size % self.block_size:
            raise ValueError(
                f"SparseConfig.window_size ({self.window_size}) must be a multiple of block_size ({self.block_size})")
        # The forced blocks (init + local + current) must fit in the budget (topk + local).
        if self.topk < self.init_blocks + 1:
            raise ValueError(
                f"SparseConfig.topk ({self.topk}) must be >= init_blocks + 1 ({self.init_blocks + 1}) so the forced "
                "blocks fit in the budget")
        if self.dense_len < -1:
            raise ValueError(f"SparseConfig.dense_len must be >= -1 (-1 = always sparse), got {self.dense_len}")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def budget(self) -> int:
        """Blocks each token sees: ``topk + local_blocks`` (forced blocks included)."""
        return self.topk + self.local_blocks

    @property
    def coarse_kernel_size(self) -> int:
        return 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return 4 * self.kernel_stride

    def is_sparse(self, key_len: int) -> bool:
        """The switch: a sequence whose key length (cache included) is below ``dense_len`` runs dense."""
        return self.dense_len < 0 or key_len >= self.dense_len

    # Conversions -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, sparse_config: Mapping[str, Any]) -> "SparseConfig":
        """Build from a MiniCPM4 ``sparse_config`` dict (unknown keys are rejected by name)."""
        if isinstance(sparse_config, SparseConfig):
            return sparse_config
        if not isinstance(sparse_config, Mapping):
            raise TypeError(f"sparse_config must be a mapping, got {type(sparse_config).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(sparse_config) - known)
        if unknown:
            raise ValueError(f"sparse_config has unknown keys {unknown}; known keys are {sorted(known)}")
        values = dict(sparse_config)
        if values.get("dense_len") is None and "dense_len" in values:
            values.pop("dense_len")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes: Any) -> "SparseConfig":
        values = self.to_dict()
        values.update(changes)
        return SparseConfig(**values)


def as_sparse_config(config) -> SparseConfig:
    """None -> the defaults; a SparseConfig as is; a MiniCPM4 ``sparse_config`` dict -> parsed."""
    if config is None:
        return SparseConfig()
    if isinstance(config, SparseConfig):
        return config
    if isinstance(config, Mapping):
        return SparseConfig.from_dict(config)
    raise TypeError(f"config must be a SparseConfig, a sparse_config dict or None, got {type(config).__name__}")
