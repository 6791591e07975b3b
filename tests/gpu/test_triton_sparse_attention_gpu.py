"""Triton stage-2 sparse attention on a GPU at full sizes (skipped without CUDA).

Accuracy rule (SPEC): error against an fp32 reference (chunked over queries, no n x n matrix) at most
2x the error of the reference rounded to the low precision (what the PyTorch reference run on bf16
inputs returns: it computes in fp32 and rounds), plus a small slack.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "dev_sparse_attention.py")


def _dev():
    spec = importlib.util.spec_from_file_location("dev_sparse_attention", _BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n,hq,hkv,d,rho", [
    (8192, 32, 2, 128, 0.97),    # standard shape, local pattern
    (16384, 32, 2, 128, 0.0),    # standard shape, random pattern
    (32768, 8, 2, 64, 0.97),     # G = 4, d = 64
])
def test_full_size(n, hq, hkv, d, rho):
    D = _dev()
    res = D.check_case(f"n={n} hq={hq} hkv={hkv} d={d} rho={rho}", [n], [n], hq, hkv, d, 64, 96, 1, 32, rho)
    assert res["ok"], res


def test_varlen_chunked_prefill():
    D = _dev()
    res = D.check_case("varlen", [3000, 0, 1, 2500, 777], [5000, 0, 4100, 2500, 9000], 8, 2, 64, 64, 32, 1, 8, 0.0)
    assert res["ok"], res


def test_g3_and_g1():
    D = _dev()
    assert D.check_case("G3", [4000], [4500], 6, 2, 64, 64, 32, 1, 8, 0.97)["ok"]
    assert D.check_case("G1 fp16", [3001], [3001], 2, 2, 128, 64, 16, 1, 4, 0.97, dtype=torch.float16)["ok"]
