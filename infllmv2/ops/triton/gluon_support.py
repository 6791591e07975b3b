"""What the Hopper kernels written in Gluon (``score_sm90.py``, ``sparse_fwd_sm90.py``) share: Triton's Gluon
imports under the names of this Triton, and the switch that runs such a kernel or hands the work back to the
Triton kernel beside it.

Gluon is Triton's experimental explicit-layout dialect; its API changes between Triton releases (the GPU machine
has 3.6, development 3.9), so every Gluon kernel has a Triton twin that computes the same thing and takes over
when Gluon is missing, turned off (``INFLLMV2_GLUON=0`` in the environment), on a Triton release the kernels were not
checked on (``VERIFIED_TRITON``; ``INFLLMV2_GLUON=1`` overrides) or cannot build the kernel.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
from triton.compiler.errors import CompilationError

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # names that changed after Triton 3.6: the CTA-wide barrier (gl.thread_barrier -> gl.barrier) and the TMA
    # load (tma.async_copy_global_to_shared -> tma.async_load)
    cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier
    tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - older Triton
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = None
    TensorDescriptor = cta_barrier = tma_load = None
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "GluonKernel", "VERIFIED_TRITON", "gluon_env_enabled", "on_sm90"]

# Triton releases (major.minor) whose Gluon builds of these kernels were checked on an H200 against their Triton twins
# (tests/gpu). Another release may compile them differently (Triton 3.9 gives the sparse forward 186 registers instead
# of 156: two programs an SM, most of the gain gone) or wrongly (3.6 miscompiled the forward's register operand at
# d 64, caught by those tests), so elsewhere the Triton twins run unless INFLLMV2_GLUON=1 asks for Gluon.
VERIFIED_TRITON = ("3.6",)


def gluon_env_enabled(version: str | None = None) -> bool:
    """Whether the Gluon kernels start enabled (read when a switch is created): ``INFLLMV2_GLUON`` = 1 / true: yes;
    0 / false / empty: no; unset: only on a Triton release in ``VERIFIED_TRITON`` (``version``: this Triton's)."""
    value = os.environ.get("INFLLMV2_GLUON")
    if value is None:
        major_minor = ".".join((version or triton.__version__).split(".")[:2])
        return major_minor in VERIFIED_TRITON
    return value.strip() not in ("0", "false", "False", "")


def on_sm90(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a Hopper (sm90) GPU and this Triton has Gluon."""
    return HAVE_GLUON and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9


class GluonKernel:
    """The switch of one Gluon kernel. ``enabled`` starts from the environment; calling the switch with the
    kernel's launcher and its arguments runs it and returns True, or returns False (the caller then runs the Triton
    twin) when this Triton's Gluon cannot build it: a ``CompilationError`` or, from its MLIR passes, a
    ``RuntimeError`` before the kernel has first run. That turns the switch off for good, with a RuntimeWarning.
    Once the kernel has run, errors propagate; an out-of-memory error always does."""

    def __init__(self, name: str):
        self.name = name
        self.enabled = gluon_env_enabled()
        self.ran = False

    def __call__(self, launch, *args, **kwargs) -> bool:
        try:
            launch(*args, **kwargs)
        except (CompilationError, RuntimeError) as err:
            if self.ran or isinstance(err, torch.cuda.OutOfMemoryError):
                raise
            self.enabled = False
            first = str(err).splitlines()[0][:200] if str(err) else ""
            warnings.warn(f"infllmv2: the sm90 {self.name} kernel does not build with Triton {triton.__version__} "
                          f"({type(err).__name__}: {first}); using the Triton kernel instead", RuntimeWarning,
                          stacklevel=3)
            return False
        self.ran = True
        return True
