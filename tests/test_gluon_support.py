"""The switch of the Gluon (Hopper) kernels: a failed build hands the work to the Triton kernel for good, with a
warning; real errors propagate; INFLLMV2_GLUON=0 / 1 turns the kernels off / on, and unset they run only on the Triton
releases they were checked on. The kernels themselves need an sm90 GPU
(tests/gpu)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
import triton
from triton.compiler.errors import CompilationError

from infllmv2.ops.triton import selection, sparse_attention
from infllmv2.ops.triton.gluon_support import VERIFIED_TRITON, GluonKernel, gluon_env_enabled


def _broken(*args):
    raise CompilationError("", ast.parse("x").body[0], "unsupported")


def _mlir_error(*args):
    raise RuntimeError("error encountered during parsing")


def _oom(*args):
    raise torch.cuda.OutOfMemoryError("out of memory")


@pytest.mark.parametrize("fail", [_broken, _mlir_error])
def test_failed_build_switches_to_the_triton_kernel_for_good(fail):
    switch = GluonKernel("test")
    switch.enabled = True
    with pytest.warns(RuntimeWarning, match="sm90 test kernel does not build"):
        assert switch(fail, 1, 2) is False
    assert switch.enabled is False and switch.ran is False


def test_launch_runs_with_its_arguments_and_later_errors_propagate():
    switch = GluonKernel("test")
    switch.enabled = True
    seen = []
    assert switch(lambda *a, **kw: seen.append((a, kw)), 1, 2, x=3) is True
    assert seen == [((1, 2), {"x": 3})] and switch.ran
    # after a successful run a build-like error is a real error
    with pytest.raises(RuntimeError):
        switch(_mlir_error)
    assert switch.enabled is True


@pytest.mark.parametrize("fail,err", [(lambda *a: 1 / 0, ZeroDivisionError), (_oom, torch.cuda.OutOfMemoryError)])
def test_other_errors_and_out_of_memory_are_not_swallowed(fail, err):
    switch = GluonKernel("test")
    switch.enabled = True
    with pytest.raises(err):
        switch(fail)
    assert switch.enabled is True


def test_each_gluon_kernel_has_its_switch():
    switches = [selection.SCORE_SM90, selection.LSE_SM90, sparse_attention.FWD_SM90, sparse_attention.FWD_SM90_WS]
    assert all(isinstance(s, GluonKernel) for s in switches)
    assert len({id(s) for s in switches}) == 4


_VERIFIED_HERE = ".".join(triton.__version__.split(".")[:2]) in VERIFIED_TRITON


@pytest.mark.parametrize("value,on", [(None, _VERIFIED_HERE), ("1", True), ("true", True), ("0", False),
                                      ("false", False), ("", False)])
def test_env_switch(value, on):
    """INFLLMV2_GLUON=1 / 0 turns every Gluon kernel on / off; unset, they are on only on a verified Triton release
    (read when the modules are imported)."""
    env = {k: v for k, v in os.environ.items() if k != "INFLLMV2_GLUON"}
    if value is not None:
        env["INFLLMV2_GLUON"] = value
    out = subprocess.run([sys.executable, "-c", "from infllmv2.ops.triton import selection, sparse_attention; "
                          "print(selection.SCORE_SM90.enabled, selection.LSE_SM90.enabled, "
                          "sparse_attention.FWD_SM90.enabled, sparse_attention.FWD_SM90_WS.enabled)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(on)] * 4


@pytest.mark.parametrize("version,on", [("3.6.0", True), ("3.6.1+git1234", True), ("3.7.1", False),
                                        ("3.9.0", False), ("4.0.0", False), ("3.5.1", False)])
def test_unset_env_enables_gluon_only_on_verified_triton_releases(version, on, monkeypatch):
    monkeypatch.delenv("INFLLMV2_GLUON", raising=False)
    assert gluon_env_enabled(version) is on
    monkeypatch.setenv("INFLLMV2_GLUON", "1")
    assert gluon_env_enabled(version) is True


@pytest.mark.parametrize("rows1,rows2,on", [(10, 3, True), (0, 3, False), (10, 0, False)])
def test_stage1_gluon_kernels_leave_inputs_without_compressed_keys_to_triton(rows1, rows2, on, monkeypatch):
    """A TMA descriptor has no empty dimension: with no fine (or coarse) key at all the Triton kernels run."""
    from infllmv2.ops.triton import lse_sm90, score_sm90
    monkeypatch.setattr(lse_sm90, "on_sm90", lambda x: True)
    monkeypatch.setattr(score_sm90, "on_sm90", lambda x: True)
    q = torch.zeros(8, 32, 128, dtype=torch.bfloat16)
    k1, k2 = (torch.zeros(n, 2, 128, dtype=torch.bfloat16) for n in (rows1, rows2))
    assert lse_sm90.lse_sm90_supported(q, k1, k2, 16, decode=False) is on
    assert score_sm90.score_sm90_supported(q, k1, 16, 4, 2, decode=False) is (rows1 > 0)
    assert not lse_sm90.lse_sm90_supported(q, k1, k2, 16, decode=True)
    assert not lse_sm90.lse_sm90_supported(q.float(), k1.float(), k2.float(), 16, decode=False)


def test_scoring_kernel_refuses_pairs_with_one_ring_slot(monkeypatch):
    """The pairs loop keeps two window tiles in flight: with one TMA slot it would read a tile the second load has
    not brought, so the launcher refuses that setting before anything runs."""
    from infllmv2.ops.triton import score_sm90
    monkeypatch.setattr(score_sm90, "_PAIRS", True)
    monkeypatch.setattr(score_sm90, "_STAGES", 1)
    with pytest.raises(ValueError, match="_STAGES >= 2"):
        score_sm90.score_blocks_sm90(*([None] * 11), tile_base=0, n_tiles=1, nb_ws=1, qk_scale=1.0, g=16, gp=16,
                                     block_t=8, kernel_size=32, kernel_stride=16, r=4, l=2, block_size=64,
                                     local_blocks=32, init_blocks=1)
